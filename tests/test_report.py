"""qtrain-report: grouping over seeds, separation of limited/incomplete runs, not-run rows, RESULTS.md."""

import json
import subprocess
import sys
from pathlib import Path

from qtrain.tools import report

EXP = "ste/mnist_lenet5_a2_relu"


def fake_run(root, name, seed, acc, limited=False, complete=True, exp=EXP):
    d = root / name
    d.mkdir(parents=True)
    rows = [{"epoch": 1, "test/acc": acc - 1, "train/loss": 0.1}, {"epoch": 2, "test/acc": acc, "train/loss": 0.05}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if complete:
        result = {"status": "complete", "final_test_acc": acc, "best_test_acc": acc + 0.1, "final_train_loss": 0.05,
                  "epochs": 2, "data_limited": limited, "device": "cpu (x86_64, 1 threads)", "wall_time_s": 120.0,
                  "train_images_per_s": 4000.0, "choices": {"experiment": exp}, "config": {"seed": seed}}
        (d / "result.json").write_text(json.dumps(result))
    return d


def test_groups_seeds_and_keeps_limited_runs_apart(tmp_path):
    fake_run(tmp_path, "a", 0, 99.0)
    fake_run(tmp_path, "b", 1, 99.4)
    fake_run(tmp_path, "c", 2, 50.0, limited=True)
    fake_run(tmp_path, "d", 3, 10.0, complete=False)
    text = report.report([tmp_path])
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {EXP} |")]
    assert "99.20 ± 0.28 (n=2)" in row and "99.30 ± 0.28 (n=2)" in row  # final and best-epoch
    assert "| 99.24 |" in row and "-0.04" in row  # the paper's number from the experiment file, and the gap
    others = text.split("not reproductions")[1]
    assert "data-limited" in others and "incomplete" in others
    # every other experiment with a paper number gets a 'not run' row with a reason
    assert "| ste/cifar10_resnet20_a4_clipped_relu | 91.24 | 4.0e-2 | not run: needs a GPU" in text
    assert "| ste/mnist_lenet5_a4_clipped_relu | 99.24 | 8.8e-4 |" in text
    assert "| bcgd/imagenet_resnet18_w1a4_all | 64.36 | — | not run: needs ImageNet" in text
    assert "band 89.98" in text  # the PARQ sanity band is labelled as a band, not a paper number


def test_write_keeps_hand_written_text(tmp_path):
    fake_run(tmp_path / "runs", "a", 0, 99.0)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n\n<!-- qtrain-report:begin -->\nold\n<!-- qtrain-report:end -->\n\nnotes\n")
    report.main([str(tmp_path / "runs"), "--write", str(md), "--plot", str(tmp_path / "c.png")])
    text = md.read_text()
    assert "intro" in text and "notes" in text and "old" not in text and EXP in text
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_collect_copies_small_files(tmp_path):
    fake_run(tmp_path / "out", "x/y", 0, 98.0)
    fake_run(tmp_path / "out", "z", 0, 98.0, complete=False)
    assert report.collect(tmp_path / "out", tmp_path / "results") == 1
    assert (tmp_path / "results" / "x" / "y" / "result.json").exists()
    assert not (tmp_path / "results" / "x" / "y" / "checkpoints").exists()


def test_scaled_runs_get_their_own_table_and_say_so(tmp_path):
    d = fake_run(tmp_path, "s", 0, 98.0)
    result = json.loads((d / "result.json").read_text())
    result.update(schedule_scale=0.1, epochs=5, unscaled_epochs=50)
    (d / "result.json").write_text(json.dumps(result))
    text = report.report([tmp_path])
    assert "ours at 1/10 of the paper's schedule (not a full reproduction)" in text
    scaled = text.split("ours at 1/10")[1].split("###")[0]
    assert f"| {EXP} |" in scaled and "5 (of 50, scale 0.1)" in scaled
    # the full-schedule table still says the cell was not run at the paper's length
    full = [line for line in text.split("ours at 1/10")[0].splitlines() if line.startswith(f"| {EXP} |")]
    assert full and "not run" in full[0]


def test_a_run_with_changed_settings_gets_its_own_row_not_a_seed_of_the_cell(tmp_path):
    for name, seed, acc, extra in [("a", 0, 99.0, []), ("b", 1, 99.4, ["seed=1"]),
                                   ("c", 0, 90.0, ["optim.lr=0.5"]), ("d", 1, 91.0, ["seed=1", "optim.lr=0.5"])]:
        d = fake_run(tmp_path, name, seed, acc)
        lines = [f"experiment={EXP}", *extra, "resume=true", "out_dir=x", "progress=false"]
        (d / "overrides.yaml").write_text("".join(f"- {o}\n" for o in lines))
    text = report.report([tmp_path])
    (cell,) = [line for line in text.splitlines() if line.startswith(f"| {EXP} |")]
    (variant,) = [line for line in text.splitlines() if line.startswith(f"| {EXP} with optim.lr=0.5 |")]
    assert "99.20 ± 0.28 (n=2)" in cell and "90.50 ± 0.71 (n=2)" in variant


def test_the_keys_that_keep_a_run_in_its_cell_cover_the_run_time_keys():
    from qtrain.keys import VOLATILE

    assert set(VOLATILE) <= report.SAME_CELL_KEYS


def test_users_own_runs_get_a_runs_table_labelled_by_overrides(tmp_path):
    d = fake_run(tmp_path, "mine/s0_20260101-000000", 0, 97.5)
    result = json.loads((d / "result.json").read_text())
    result.update(choices={}, config={"seed": 0, "abits": 4, "wbits": 1})
    (d / "result.json").write_text(json.dumps(result))
    (d / "overrides.yaml").write_text("- method=bcgd\n- wbits=1\n- abits=4\n- out_dir=x\n")
    text = report.report([tmp_path])
    runs = text.split("### Runs\n")[1].split("###")[0]
    assert "| method=bcgd wbits=1 abits=4 | 97.50 |" in runs and "s0_2026" not in runs
    assert "session" not in text  # notes about how the committed results were made stay in RESULTS.md


def test_runs_started_from_another_run_are_kept_apart_and_shown_per_epoch(tmp_path):
    """[STE] §4.2: two instability runs from different starts are two rows (not one mean over 'seeds'),
    and each gets a per-epoch table whose epoch 0 is the last epoch of the run it started from."""
    fake_run(tmp_path, "runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_1", 0, 84.0,
             exp="ste/cifar10_resnet20_a4_clipped_relu")
    exp = "ste/cifar10_resnet20_a4_instability"
    for name, init, acc in [("s0_2", "outputs/cifar/runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_1", 80.0),
                            ("s0_3", "elsewhere/a4_relu_run", 70.0)]:
        d = fake_run(tmp_path, f"runs/cifar10_resnet20_float_wfa4_identity/{name}", 0, acc)
        result = json.loads((d / "result.json").read_text())
        result.update(choices={"experiment": exp}, config={"seed": 0, "init": f"{init}/checkpoints/last.pt"})
        (d / "result.json").write_text(json.dumps(result))
    text = report.report([tmp_path])
    rows = [line for line in text.splitlines() if line.startswith(f"| {exp} ")]
    assert len(rows) == 2 and "(from cifar10_resnet20_a4_clipped_relu)" in rows[0] and "80.00 (n=1)" in rows[0]
    assert "(from elsewhere/a4_relu_run/checkpoints/last.pt)" in rows[1] and "70.00 (n=1)" in rows[1]
    table = text.split(f"per epoch: {exp} (from cifar10_resnet20_a4_clipped_relu) (seed 0)")[1].split("###")[0]
    assert "| 0 (start: cifar10_resnet20_a4_clipped_relu's last epoch) | 0.0500 | 84.00 |" in table  # the source's last epoch
    assert "| 2 | 0.0500 | 80.00 |" in table
    assert "test accuracy 84.00 → 80.00 (-4.00 points)" in table
    # a start that is not among the results: its rows, no invented epoch 0
    other = text.split("(from elsewhere/a4_relu_run/checkpoints/last.pt) (seed 0)")[1].split("###")[0]
    assert "| 1 |" in other and "start" not in other
    assert report.plot([tmp_path], tmp_path / "i.png", "a4_instability") == 2
    assert report.plot([tmp_path], tmp_path / "c.png", "cifar10_resnet20", exclude="instability") == 1
    assert report.plot([tmp_path], tmp_path / "none.png", "vgg11") == 0 and not (tmp_path / "none.png").exists()


def test_runs_from_differently_trained_cells_get_tables_of_their_own(tmp_path):
    """Part 8's and part 10's a4 clipped_relu cells share a name but not their training (a 1/10-recipe and a
    full-recipe float start): the §4.2 runs from them are two tables, never one mean over two 'seeds'."""
    exp = "ste/cifar10_resnet20_a4_instability"
    for i, (fscale, acc) in enumerate([(0.1, 70.0), (1.0, 88.0)]):
        src = fake_run(tmp_path, f"runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_{i}", 0, 84.0 + i,
                       exp="ste/cifar10_resnet20_a4_clipped_relu")
        result = json.loads((src / "result.json").read_text())
        result.update(schedule_scale=0.1, unscaled_epochs=200, config={"seed": 0, "init": "float"},
                      float_start={"schedule_scale": fscale, "epochs": round(200 * fscale), "final_test_acc": 90.0})
        (src / "result.json").write_text(json.dumps(result))
        d = fake_run(tmp_path, f"runs/cifar10_resnet20_float_wfa4_identity/s0_{i + 5}", 0, acc, exp=exp)
        result = json.loads((d / "result.json").read_text())
        result["config"]["init"] = f"outputs/x/runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_{i}/checkpoints/last.pt"
        (d / "result.json").write_text(json.dumps(result))
    text = report.report([tmp_path])
    part8 = text.split("### [STE] §4.2 instability, from cells at 1/10 of the schedule\n")[1].split("###")[0]
    part10 = text.split("### [STE] §4.2 instability, from cells at 1/10 of the schedule (full-recipe float start)\n")[1]
    assert "70.00 (n=1)" in part8 and "88.00" not in part8
    assert "88.00 (n=1)" in part10.split("###")[0]
    assert "### [STE] §4.2 instability\n" not in text  # no table claims the paper's setting
    # and each per-epoch table names its start's training and begins at that cell's last epoch
    per_epoch = text.split("### [STE] §4.2 instability, from cells at 1/10 of the schedule (full-recipe float start), "
                           "per epoch: ")[1].split("###")[0]
    assert "| 0 (start: cifar10_resnet20_a4_clipped_relu's last epoch) | 0.0500 | 85.00 |" in per_epoch


def test_a_running_run_knows_its_start_from_its_overrides(tmp_path):
    """A §4.2 run still training has no result.json: its init= override names its start, so the plot's
    label says 'from <cell>' and its curve begins at that cell's last epoch (epoch 0)."""
    fake_run(tmp_path, "runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_1", 0, 84.0,
             exp="ste/cifar10_resnet20_a4_clipped_relu")
    d = fake_run(tmp_path, "runs/cifar10_resnet20_float_wfa4_identity/s0_2", 0, 83.0, complete=False)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(
        "- experiment=ste/cifar10_resnet20_a4_instability\n"
        "- init=outputs/cifar/runs/cifar10_resnet20_float_wfa4_clipped_relu/s0_1/checkpoints/last.pt\n")
    runs = report.read_runs([tmp_path])
    running = next(r for r in runs if r["result"] is None)
    assert report.source_label(running, runs) == "cifar10_resnet20_a4_clipped_relu"
    assert report.start_row(running, runs) == {"epoch": 0, "test/acc": 84.0, "train/loss": 0.05}
    assert report.plot([tmp_path], tmp_path / "i.png", "a4_instability") == 1


def test_a_reader_that_stops_early_ends_the_report_quietly(tmp_path):
    # `qtrain-report results/ | head`: the reader is gone before the tables are printed
    fake_run(tmp_path, "a", 0, 99.0)
    cmd = [str(Path(sys.executable).parent / "qtrain-report"), str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err, err.decode()


def test_float_starting_points_say_which_batch_norm_they_have(tmp_path):
    for name, seed, affine in (("float/a", 0, False), ("float/b", 0, True)):
        d = fake_run(tmp_path, name, seed, 85.0, exp=None)
        result = json.loads((d / "result.json").read_text())
        result["choices"] = {}
        result["config"] = {"seed": seed, "abits": None, "wbits": None,
                            "data": {"_target_": "qtrain.data.cifar10"},
                            "model": {"_target_": "qtrain.models.resnet20", "norm_affine": affine}}
        (d / "result.json").write_text(json.dumps(result))
    floats = report.report([tmp_path]).split("Float starting points")[1].split("###")[0]
    assert "| cifar10 | resnet20 | 0 |" in floats and "| cifar10 | resnet20 (affine BN) | 0 |" in floats


def test_curves_from_a_full_recipe_float_start_are_named_apart(tmp_path):
    """Part 8's cells (float start at the cell's 1/10) and part 10's (float start at the full recipe) share
    experiment and seed: the plot's legend says which is which, for finished and running runs alike."""
    exp = "ste/cifar10_resnet20_a4_clipped_relu"
    for name, float_scale in (("part8", 0.1), ("part10", 1)):
        d = fake_run(tmp_path, f"{name}/runs/cell/s0_1", 0, 84.0, exp=exp)
        result = json.loads((d / "result.json").read_text())
        result.update(schedule_scale=0.1, config={"seed": 0, "init": "float"},
                      float_start={"schedule_scale": float_scale, "epochs": round(200 * float_scale)})
        (d / "result.json").write_text(json.dumps(result))
    d = fake_run(tmp_path, "part10/runs/cell/s0_2", 0, 80.0, complete=False)
    (d / "overrides.yaml").write_text(f"- experiment={exp}\n- schedule_scale=0.1\n- pretrain.schedule_scale=1\n")
    runs = report.read_runs([tmp_path])
    names = {str(r["dir"].relative_to(tmp_path)): report.curve_name(r, runs) for r in runs}
    assert names["part8/runs/cell/s0_1"] == exp
    assert names["part10/runs/cell/s0_1"] == names["part10/runs/cell/s0_2"] == f"{exp} (from a full-recipe float start)"
