"""A run stopped after epoch k and resumed ends with exactly the weights of an uninterrupted run."""

import json

import pytest
import torch

from qtrain.run.runner import main_run, train_run

SMALL = ["epochs=3", "data.limit_train=192", "data.limit_test=64", "data.batch_size=32"]
METHODS = {
    "float": ["method=float", "abits=2"],
    "ste": ["method=ste", "wbits=1", "abits=2"],
    "binaryrelax": ["method=binaryrelax", "wbits=2", "abits=4", "method.phase2_epoch=2"],
    "bcgd_learned_alpha": ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true", "method.rho=0.01"],
}


def final_model(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(make_cfg, mnist_root, tmp_path, method):
    cfg = make_cfg(*SMALL, *METHODS[method], f"data.root={mnist_root}")
    runs = tmp_path / "outputs" / "runs"  # under cfg.out_dir, where resume=true looks
    full = train_run(cfg, runs / "full")
    assert full["status"] == "complete"

    cfg.stop_after_epoch = 1
    assert train_run(cfg, runs / "part")["status"] == "stopped"
    assert not (runs / "part" / "result.json").exists()
    cfg.stop_after_epoch = None
    cfg.resume = True  # finds the unfinished run by its config fingerprint
    (runs / "new").mkdir()
    resumed = main_run(cfg, runs / "new", {})
    assert resumed["status"] == "complete" and resumed["resumed"]
    assert resumed["run_dir"] == str(runs / "part")

    a, b = final_model(runs / "full"), final_model(runs / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (runs / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert resumed["final_test_acc"] == full["final_test_acc"]
    # resume=true again: the latest run of this config is complete, so nothing is trained
    (runs / "again").mkdir()
    again = main_run(cfg, runs / "again", {})
    assert again["run_dir"] == str(runs / "part") and not (runs / "again" / "metrics.jsonl").exists()
