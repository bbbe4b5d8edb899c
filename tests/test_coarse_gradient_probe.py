"""scripts/coarse_gradient_probe.py: each STE's coarse gradient and the loss change one step along it, checked
against the same quantities computed here independently."""

import json

import pytest
import torch

from qtrain.run.runner import train_run
from qtrain.tools.eval import load_run


@pytest.fixture
def probe(load_script):
    return load_script("coarse_gradient_probe")


@pytest.fixture
def a2_cell(make_cfg, fake_cifar_root, tmp_path):
    """A 2-bit ResNet-20 cell (float weights) trained for 1 epoch on the stand-in data, 8 batches of 8."""
    cfg = make_cfg("experiment=ste/cifar10_resnet20_a2_relu", "init=null", "epochs=1", "data.batch_size=8",
                   f"data.root={fake_cifar_root}")
    train_run(cfg, tmp_path / "run")
    return tmp_path / "run"


def _loss(model, batches, task):
    with torch.no_grad():
        return sum(float(task.loss(model(x), y)) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)


def test_the_probe_measures_what_it_says_and_puts_the_model_back(probe, a2_cell):
    _, _, cfg, data, model, _, _, task = load_run(a2_cell, limit_train=None)
    grad_batches, probe_batches = probe._batches(data, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = probe.probe(model, task, grad_batches, probe_batches, [0.03, 0.3])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    assert out["loss"] == pytest.approx(_loss(model, probe_batches, task), rel=1e-6)
    noise = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for row in out["random"]:  # the noise floor: a step of the same length in a random direction
        with torch.no_grad():
            for p, d in zip(params, torch.split(noise / noise.norm(), [p.numel() for p in params])):
                p.sub_(row["step"] * d.view_as(p).float())
        assert row["realised"] == pytest.approx(_loss(model, probe_batches, task) - out["loss"], rel=1e-4, abs=1e-7)
        model.load_state_dict(before)
    for ste in probe.STES:
        probe._set_ste(model, ste)
        model.zero_grad()
        # both halves hold one batch of 8: the mean over the two is the gradient of the mean loss
        sum(task.loss(model(x), y) for x, y in grad_batches).div(2).backward()
        g = [p.grad.clone() for p in params]
        model.load_state_dict(before)
        model.train()
        e = out["estimators"][ste]
        norm = float(torch.cat([t.flatten() for t in g]).double().norm())
        assert e["norm"] == pytest.approx(norm, rel=1e-5)
        for step in e["steps"]:
            with torch.no_grad():
                for p, d in zip(params, g):
                    p.sub_(step["step"] / norm * d)
            assert step["realised"] == pytest.approx(_loss(model, probe_batches, task) - out["loss"], rel=1e-4, abs=1e-7)
            model.load_state_dict(before)
    # the three estimators differ (2-bit activations: inputs below 0 and above the top exist)
    cos = out["cosines"]
    assert all(c < 1 - 1e-6 for c in cos.values())
    assert len(out["layers"]) == len(params)


def test_cli_appends_one_json_line_per_run_and_refuses_quantized_weights(probe, a2_cell, make_cfg,
                                                                          fake_cifar_root, tmp_path, capsys):
    probe.main(["run", str(a2_cell), "--batches", "2", "--step", "0.1", "--json", str(tmp_path / "p.jsonl")])
    (line,) = (tmp_path / "p.jsonl").read_text().splitlines()
    r = json.loads(line)
    assert r["trained_with"] == "relu" and r["abits"] == 2 and set(r["estimators"]) == set(probe.STES)
    assert [s["step"] for s in r["estimators"]["relu"]["steps"]] == [0.1] and r["random"][0]["step"] == 0.1

    cfg = make_cfg("model=resnet20", "data=cifar10", f"data.root={fake_cifar_root}", "abits=2", "wbits=1",
                   "method=binaryrelax", "epochs=1", "data.batch_size=16")
    train_run(cfg, tmp_path / "br")
    with pytest.raises(SystemExit) as e:
        probe.main(["run", str(tmp_path / "br"), "--batches", "1"])
    assert e.value.code != 0 and "--batches 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        probe.main(["run", str(tmp_path / "br"), "--batches", "2"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after any log noise of earlier tests)
    assert e.value.code != 0 and last.startswith("coarse_gradient_probe: error:") and "float weights" in last
    with pytest.raises(SystemExit) as e:  # 64 images in batches of 8: 8 batches, not 2 x 5
        probe.main(["run", str(a2_cell), "--batches", "5"])
    assert "only 8 batches" in capsys.readouterr().err
