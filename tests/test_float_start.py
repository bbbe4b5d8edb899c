"""init=float with the float start's own schedule (pretrain.schedule_scale) and seed (pretrain.seed):
what the float model trains, which cached model a cell reuses, what result.json and qtrain-report say."""

import json

import pytest
from omegaconf import open_dict

from qtrain.errors import ConfigError
from qtrain.run.float_start import effective_pretrain, float_config
from qtrain.run.resume import fingerprint, identity
from qtrain.run.float_cache import float_run_dir
from qtrain.run.runner import main_run
from qtrain.run.schedule import scale_schedule
from qtrain.run.validate import validate
from qtrain.tools import report

CELL = "experiment=ste/cifar10_resnet20_a4_clipped_relu"


def test_the_float_start_gets_its_own_schedule(make_cfg):
    cfg = make_cfg(CELL, "schedule_scale=0.1", "pretrain.schedule_scale=1")
    cell, start = scale_schedule(cfg), scale_schedule(float_config(cfg))
    assert (cell.epochs, list(cell.sched.milestones)) == (20, [8, 14])
    assert (start.epochs, list(start.sched.milestones), start.optim.lr) == (200, [80, 140], 0.1)
    # the full-recipe float model is the one a full-schedule cell starts from, whatever the cell's scale
    for other in (make_cfg(CELL), make_cfg(CELL, "schedule_scale=0.25", "pretrain.schedule_scale=1")):
        assert fingerprint(float_config(other)) == fingerprint(float_config(cfg))
    # and it is a different cell from the one whose float start is scaled with it
    assert identity(cfg) != identity(make_cfg(CELL, "schedule_scale=0.1"))


def test_null_leaves_every_earlier_run_as_it_was(make_cfg):
    """The default pretrain.schedule_scale=null is "the cell's own scale": no entry of the identity."""
    cfg = make_cfg(CELL, "schedule_scale=0.1")
    assert cfg.pretrain.schedule_scale is None and effective_pretrain(cfg) == {"optim": {"lr": 0.1}}
    assert float_config(cfg).schedule_scale == 0.1
    bare = make_cfg(CELL, "schedule_scale=0.1")
    with open_dict(bare):
        del bare.pretrain["schedule_scale"]  # a config from before the key existed
    assert identity(cfg) == identity(bare) and fingerprint(float_config(cfg)) == fingerprint(float_config(bare))


def test_a_second_seed_of_the_quantized_phase_keeps_the_float_start(make_cfg):
    seed0 = make_cfg(CELL, "schedule_scale=0.1", "pretrain.schedule_scale=1")
    seed1 = make_cfg(CELL, "schedule_scale=0.1", "pretrain.schedule_scale=1", "seed=1", "++pretrain.seed=0")
    key = fingerprint(float_config(seed0))
    assert fingerprint(float_config(seed1)) == key
    assert float_run_dir(seed1, key) == float_run_dir(seed0, key) and float_run_dir(seed0, key).name.startswith(
        "cifar10_resnet20_s0_")
    assert identity(seed1) != identity(seed0)


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "true"])
def test_a_bad_float_schedule_is_one_clear_error(make_cfg, bad):
    cfg = make_cfg(CELL, f"pretrain.schedule_scale={bad}")
    with pytest.raises(ConfigError, match=r"^pretrain\.schedule_scale must be a number in \(0, 10\]"):
        validate(cfg)


def test_a_cell_records_which_float_start_it_came_from(make_cfg, mnist_root, tmp_path):
    """A scaled cell from a full-schedule float model: the float run has its own epochs, the cell's
    result.json names it in float_start, and a second quantized seed reuses it instead of retraining."""
    tiny = ["experiment=ste/mnist_lenet5_a2_clipped_relu", f"data.root={mnist_root}", "data.limit_train=32",
            "data.limit_test=16", "data.batch_size=16", "epochs=4", "schedule_scale=0.5", "++pretrain.epochs=2",
            "pretrain.schedule_scale=1"]
    results = []
    for seed in (0, 1):
        cfg = make_cfg(*tiny, f"seed={seed}", "++pretrain.seed=0")
        run_dir = tmp_path / f"cell{seed}"
        run_dir.mkdir()
        results.append(main_run(cfg, run_dir, {"experiment": "ste/mnist_lenet5_a2_clipped_relu"}))
    floats = list((tmp_path / "outputs" / "float").iterdir())
    assert len(floats) == 1  # seed 1's quantized phase started from seed 0's float model
    float_result = json.loads((floats[0] / "result.json").read_text())
    assert (float_result["epochs"], float_result["schedule_scale"], float_result["config"]["seed"]) == (2, 1, 0)
    for r in results:
        assert (r["epochs"], r["unscaled_epochs"], r["schedule_scale"]) == (2, 4, 0.5)
        start = r["float_start"]
        assert start["run_dir"] == str(floats[0]) and start["schedule_scale"] == 1 and start["epochs"] == 2
        assert start["final_test_acc"] == float_result["final_test_acc"]
        assert start["fingerprint"] == (floats[0] / "fingerprint.txt").read_text().strip()
        assert r["init"] == str(floats[0] / "checkpoints" / "last.pt")
    assert [r["config"]["seed"] for r in results] == [0, 1]


def _cell(root, name, acc, float_start=None, scale=0.1, init="float", seed=0):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 20, "test/acc": acc, "train/loss": 0.3}) + "\n")
    result = {"status": "complete", "final_test_acc": acc, "best_test_acc": acc, "final_train_loss": 0.3,
              "epochs": 20, "schedule_scale": scale, "unscaled_epochs": 200, "data_limited": False,
              "device": "cpu (x86_64, 1 threads)", "wall_time_s": 3600.0, "train_images_per_s": 200.0,
              "choices": {"experiment": "ste/cifar10_resnet20_a4_clipped_relu"},
              "config": {"seed": seed, "init": init}, "init": "outputs/cifar/float/cifar10_resnet20_s0_x/checkpoints/last.pt"}
    if float_start:
        result["float_start"] = float_start
    (d / "result.json").write_text(json.dumps(result))


def test_the_report_keeps_cells_from_a_full_recipe_float_start_in_their_own_table(tmp_path):
    full = {"run_dir": "outputs/cifar_full/float/cifar10_resnet20_s0_y", "epochs": 200, "schedule_scale": 1,
            "unscaled_epochs": 200, "final_test_acc": 91.5, "best_test_acc": 91.7}
    _cell(tmp_path, "full/runs/a/s0_1", 90.9, float_start=full)
    _cell(tmp_path, "s01/runs/a/s0_1", 83.8)  # part 8: no float_start yet; its float run is among the results
    d = tmp_path / "s01" / "float" / "cifar10_resnet20_s0_x"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 20, "test/acc": 84.4}) + "\n")
    (d / "result.json").write_text(json.dumps({
        "status": "complete", "final_test_acc": 84.42, "best_test_acc": 84.5, "final_train_loss": 0.4, "epochs": 20,
        "schedule_scale": 0.1, "unscaled_epochs": 200, "data_limited": False, "device": "cpu", "wall_time_s": 1.0,
        "train_images_per_s": 1.0, "choices": {}, "config": {"seed": 0, "abits": None, "wbits": None,
                                                            "data": {"_target_": "qtrain.data.cifar10"},
                                                            "model": {"_target_": "qtrain.models.resnet20"}}}))
    text = report.report([tmp_path])
    head = "### [STE] Table 1, from a full-recipe float start: the quantized phase at 1/10 of the paper's schedule"
    assert head in text
    own = text.split(head)[1].split("###")[0]
    assert "90.90 (n=1)" in own and "| full recipe, 200 epochs: 91.50 |" in own and "83.80" not in own
    part8 = text.split("### [STE] Table 1: ours at 1/10 of the paper's schedule")[1].split("###")[0]
    assert "83.80 (n=1)" in part8 and "| 1/10 (20 of 200 epochs): 84.42 |" in part8 and "90.90" not in part8
    assert report.float_start_text([None]) == "—"  # a cell that did not start from the float model
    two_seeds = [{"schedule_scale": 0.1, "epochs": 20, "unscaled_epochs": 200, "final_test_acc": a} for a in (84.42, 85.24)]
    assert report.float_start_text(two_seeds) == "1/10 (20 of 200 epochs): 84.42, 85.24"


def test_the_report_shows_how_the_gap_closes_with_the_quantized_schedule(tmp_path):
    full = {"run_dir": "outputs/cifar_full/float/cifar10_resnet20_s0_y", "epochs": 200, "schedule_scale": 1,
            "unscaled_epochs": 200, "final_test_acc": 91.5, "best_test_acc": 91.7}
    _cell(tmp_path, "full/runs/a/s0_1", 89.0, float_start=full)
    _cell(tmp_path, "full/runs/a/s1_1", 89.5, float_start=full, seed=1)
    _cell(tmp_path, "full/runs/a/s0_2", 90.8, float_start=full, scale=0.25)
    text = report.report([tmp_path])
    head = "### [STE] Table 1, from a full-recipe float start: the gap to the paper against the quantized schedule"
    assert head in text
    table = text.split(head)[1].split("###")[0]
    assert "| ours at 1/10: final acc, Δ paper | ours at 1/4: final acc, Δ paper |" in table
    (row,) = [line for line in table.splitlines() if line.startswith("| ste/cifar10_resnet20_a4_clipped_relu |")]
    assert row == ("| ste/cifar10_resnet20_a4_clipped_relu | 91.24 | 89.25 ± 0.35 (n=2), -1.99 | "
                   "90.80 (n=1), -0.44 |")
    _cell(tmp_path / "one", "runs/a/s0_1", 89.0, float_start=full)  # one schedule only: no such table
    assert "against the quantized schedule" not in report.report([tmp_path / "one"])
