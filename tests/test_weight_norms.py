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
    norms.main([str(tmp_path / "run"), "--from", str(tmp_path / "run" / "checkpoints" / "last.pt"),
                "--json", str(tmp_path / "c.jsonl")])
    change = json.loads((tmp_path / "c.jsonl").read_text())["change"]
    assert change["all"]["distance"] == 0 and set(change) == set(r["groups"])
    with pytest.raises(SystemExit) as e:
        norms.main([str(tmp_path / "nothing")])
    # (the last line: an earlier test's log handler may have left "Logging error" noise on stderr before it)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and last.startswith("weight_norms: error:") and "no such checkpoint" in last


def test_change_from_a_start_is_distance_and_angle_per_group(norms):
    w0 = {"stem.weight": torch.zeros(4, 3, 3, 3), "a.conv.weight": torch.ones(16, 4, 3, 3)}
    w0["stem.weight"][0, 0, 0, 0] = 1.0
    w = {"stem.weight": torch.zeros(4, 3, 3, 3), "a.conv.weight": 3 * torch.ones(16, 4, 3, 3)}
    w["stem.weight"][1, 0, 0, 0] = 1.0  # turned by 90 degrees, same norm
    c = norms.weight_change(w, w0)
    assert c["stem"]["angle_deg"] == pytest.approx(90) and c["stem"]["distance"] == pytest.approx(2**0.5)
    assert c["16 channels"]["angle_deg"] == pytest.approx(0, abs=1e-5) and c["16 channels"]["distance"] == pytest.approx(2)
    assert 0 < c["all"]["angle_deg"] < 90
    with pytest.raises(norms.QtrainError, match="not this run's start"):
        norms.weight_change(w, {"stem.weight": torch.ones(4, 3, 3, 3)})
