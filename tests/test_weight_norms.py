"""scripts/weight_norms.py: per-layer and per-stage weight norms of a checkpoint."""

import json

import pytest
import torch

from qtrain.run.runner import train_run


@pytest.fixture
def norms(load_script):
    return load_script("weight_norms")


def test_groups_are_the_stem_the_stages_by_width_and_the_classifier(norms):
    state = {"stem.weight": torch.full((16, 3, 3, 3), 1.0), "a.conv.weight": torch.full((16, 16, 3, 3), 2.0),
             "b.conv.weight": torch.full((32, 16, 3, 3), 1.0), "b.bn.weight": torch.ones(32),  # 1-d: not counted
             "fc.weight": torch.full((10, 32), 3.0), "fc.bias": torch.ones(10)}
    out = norms.weight_norms(state)
    assert set(out["layers"]) == {"stem.weight", "a.conv.weight", "b.conv.weight", "fc.weight"}
    g = out["groups"]
    assert g["stem"] == pytest.approx(432**0.5) and g["16 channels"] == pytest.approx(2 * 2304**0.5)
    assert g["32 channels"] == pytest.approx(4608**0.5) and g["fc"] == pytest.approx(3 * 320**0.5)
    assert g["all"] == pytest.approx((432 + 4 * 2304 + 4608 + 9 * 320) ** 0.5)


def test_cli_reads_a_verified_run_checkpoint_and_fails_clearly(norms, make_cfg, fake_cifar_root, tmp_path, capsys):
    cfg = make_cfg("model=resnet20", "data=cifar10", f"data.root={fake_cifar_root}", "abits=2", "epochs=1",
                   "data.batch_size=16")
    train_run(cfg, tmp_path / "run")
    norms.main([str(tmp_path / "run"), "--json", str(tmp_path / "n.jsonl")])
    r = json.loads((tmp_path / "n.jsonl").read_text())
    assert r["epoch"] == 1 and set(r["groups"]) == {"stem", "16 channels", "32 channels", "64 channels", "fc", "all"}
    assert len(r["layers"]) == 20  # ResNet-20: 19 convolutions and the classifier
    with pytest.raises(SystemExit) as e:
        norms.main([str(tmp_path / "nothing")])
    # (the last line: an earlier test's log handler may have left "Logging error" noise on stderr before it)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and last.startswith("weight_norms: error:") and "no such checkpoint" in last
