"""scripts/activation_stats.py: where the inputs of the quantized activations fall (below 0, on the staircase,
above its top), counted against the inputs themselves."""

import json

import pytest
import torch

from qtrain.quant.act import QuantReLU
from qtrain.run import float_cache
from qtrain.run.runner import train_run
from qtrain.tools.eval import load_run


@pytest.fixture
def stats(load_script):
    return load_script("activation_stats")


@pytest.fixture
def a2_cell(make_cfg, fake_cifar_root, tmp_path):
    """A 2-bit ResNet-20 cell trained for 1 epoch on the stand-in data (from no float start)."""
    cfg = make_cfg("experiment=ste/cifar10_resnet20_a2_relu", "init=null", "epochs=1", f"data.root={fake_cifar_root}")
    train_run(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_counts_match_the_inputs_the_activations_receive(stats, a2_cell):
    _, _, _, data, model, _, _, _ = load_run(a2_cell)
    seen = {}  # every quantized activation's inputs, captured independently of the script's counter
    for name, m in model.named_modules():
        if isinstance(m, QuantReLU):
            m.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].clone()))
    out = stats.count_regions(model, data.test, torch.device("cpu"), torch.no_grad())
    assert set(out["layers"]) == set(seen) and len(seen) == 19  # ResNet-20: stem + 2 per block
    for name, s in out["layers"].items():
        x = torch.cat(seen[name]).double()
        top = 3 * s["alpha"]
        assert s["elements"] == x.numel()
        assert s["below"] == pytest.approx(float((x <= 0).double().mean()))
        assert s["above"] == pytest.approx(float((x > top).double().mean()))
        assert s["below"] + s["inside"] + s["above"] == pytest.approx(1.0)
        assert sum(s["levels"]) == pytest.approx(1.0) and len(s["levels"]) == 4
        assert s["levels"][0] == pytest.approx(s["below"])  # ceil rounding: level 0 is x <= 0 exactly
        assert s["mean"] == pytest.approx(float(x.mean()), abs=1e-9)
        per_channel_below = (x <= 0).double().mean((0, 2, 3))
        per_channel_above = (x > top).double().mean((0, 2, 3))
        assert s["channels"] == x.shape[1]
        assert s["channels_off"] == int((per_channel_below >= stats.OFF).sum())
        assert s["channels_saturated"] == int((per_channel_above >= stats.SATURATED).sum())
        assert s["channel_above_max"] == pytest.approx(float(per_channel_above.max()))
    # the block's second activation sees BN + shortcut; the groups partition the layers
    groups = out["groups"]
    assert groups["act1"]["layers"] + groups["act2"]["layers"] == groups["all"]["layers"] == 19
    assert groups["act2"]["layers"] == 9
    assert groups["all"]["channels"] == sum(s["channels"] for s in out["layers"].values()) == 16 * 7 + 32 * 6 + 64 * 6


def test_batch_statistics_leave_the_model_as_it_was(stats, a2_cell):
    _, _, _, data, model, _, _, _ = load_run(a2_cell)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    running = stats.count_regions(model, data.test, torch.device("cpu"), torch.no_grad())
    batch = stats.count_regions(model, data.test, torch.device("cpu"), torch.no_grad(), batch_stats=True)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # batch statistics normalise each batch to mean 0 / std 1 before the stem's activation: not the running ones
    assert batch["layers"]["stem.2"]["mean"] != pytest.approx(running["layers"]["stem.2"]["mean"])
    assert abs(batch["layers"]["stem.2"]["mean"]) < 1e-6


def test_the_start_is_the_same_for_every_ste_and_the_cli_writes_json(stats, make_cfg, fake_cifar_root, tmp_path,
                                                                      capsys):
    cell = ["schedule_scale=0.01", f"data.root={fake_cifar_root}", f"out_dir={tmp_path / 'outputs'}", "progress=false"]
    with pytest.raises(SystemExit) as e:  # never trains the float model itself: a clear error
        stats.main(["start", "experiment=ste/cifar10_resnet20_a2_relu", *cell])
    assert e.value.code != 0 and "no finished float model" in capsys.readouterr().err
    float_cache.float_checkpoint(make_cfg("experiment=ste/cifar10_resnet20_a2_relu", *cell), train_run)
    out = tmp_path / "stats.jsonl"
    for ste in ("relu", "identity", "clipped_relu"):
        stats.main(["start", f"experiment=ste/cifar10_resnet20_a2_{ste}", *cell, "--json", str(out), "--quiet"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ste"] for r in rows] == ["relu", "identity", "clipped_relu"]
    assert len({r["float_model"] for r in rows}) == 1
    # the three estimators share the forward pass, so the same inputs reach the staircase
    assert rows[0]["layers"] == rows[1]["layers"] == rows[2]["layers"]
    assert rows[0]["groups"]["all"]["above"] > 0  # a 2-bit top (1.95) is inside a normalised input's range


def test_a_run_argument_that_is_not_a_run_is_a_clear_error(stats, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        stats.main(["run", str(tmp_path)])
    assert e.value.code != 0 and "no such checkpoint" in capsys.readouterr().err
