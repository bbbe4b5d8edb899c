"""The installed `qtrain` command: help, --cfg, a smoke run's files, and the error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QTRAIN = str(Path(sys.executable).parent / "qtrain")
SMALL = ["epochs=1", "data.limit_train=256", "data.limit_test=128", "progress=false"]


def qtrain(*args, cwd, env_data=None):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if env_data is not None:
        env["QTRAIN_DATA"] = env_data
    return subprocess.run([QTRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help(tmp_path):
    r = qtrain("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "qtrain method=bcgd" in r.stdout and "method: bcgd, binaryrelax, float, ste" in r.stdout


def test_python_dash_m_is_the_same_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qtrain", "--cfg", "job", "abits=4"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "abits: 4" in r.stdout


def test_cfg_job_composes_cifar(tmp_path):
    r = qtrain("--cfg", "job", "method=float", "ste=clipped_relu", "data=cifar10", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "qtrain.data.cifar10" in r.stdout and "name: clipped_relu" in r.stdout


def test_smoke_run_writes_every_file(tmp_path, mnist_root):
    r = qtrain(*SMALL, "init=float", "out_dir=out", cwd=tmp_path, env_data=mnist_root)
    assert r.returncode == 0, r.stderr
    (run,) = [p.parent for p in (tmp_path / "out").glob("runs/*/*/result.json")]
    # the float model init=float trained first has its log in its own cached folder too
    (cached,) = [p.parent for p in (tmp_path / "out").glob("float/*/result.json")]
    float_log = (cached / "qtrain.log").read_text()
    assert f"whose own log (from its start) is {run / 'qtrain.log'}" in float_log and "done: final test" in float_log
    assert float_log.count("done: final test") == 1 and (run / "qtrain.log").read_text().count("done: final") == 2
    for f in (".hydra/config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("epoch", "train/loss", "train/acc", "test/loss", "test/acc", "lr"):
        assert key in row
    result = json.loads((run / "result.json").read_text())
    for key in ("final_test_acc", "best_test_acc", "final_train_loss", "epochs", "wall_time_s", "train_images_per_s",
                "device", "torch_version", "git_sha", "git_dirty", "config", "model_summary"):
        assert key in result, key
    assert result["data_limited"] is True and 0 <= result["final_test_acc"] <= 100


def test_missing_data_is_one_clear_error(tmp_path):
    r = qtrain(*SMALL, f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert r.returncode == 2
    assert "MNIST was not found" in r.stderr and str(tmp_path / "nowhere") in r.stderr
    assert "QTRAIN_DATA" in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("override", ["data=svhn", "nosuchkey=1", "method=ste,bcgd"])
def test_unknown_options_fail_without_traceback(tmp_path, override):
    r = qtrain(override, "epochs=1", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_float_method_with_wbits_is_refused(tmp_path, mnist_root):
    r = qtrain(*SMALL, "wbits=1", "method=float", cwd=tmp_path, env_data=mnist_root)
    assert r.returncode == 2 and "method=float trains float weights" in r.stderr


def test_sweep_reports_failed_job_and_runs_the_others(tmp_path, mnist_root):
    r = qtrain("-m", "abits=0,2", *SMALL, "out_dir=out", cwd=tmp_path, env_data=mnist_root)
    assert r.returncode == 1
    assert "1 job(s) of the sweep failed" in r.stderr and "abits=0" in r.stderr
    results = list((tmp_path / "out").glob("multirun/*/*/result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["config"]["abits"] == 2


def test_model_that_does_not_fit_the_data_is_one_clear_error(tmp_path, mnist_root):
    r = qtrain(*SMALL, "model=vgg11", cwd=tmp_path, env_data=mnist_root)
    assert r.returncode == 2 and "model VGG does not fit data mnist" in r.stderr and "Traceback" not in r.stderr


def test_git_dirty_means_the_source_changed_not_the_results(tmp_path):
    """result.json's git_dirty: a campaign snapshots finished runs into results/ while others train, which
    must not mark them dirty; an edit under qtrain/ or configs/ must."""
    from qtrain.store.record import code_identity

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    for name in ("qtrain/a.py", "configs/b.yaml", "results/c.json", "RESULTS.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    assert code_identity(tmp_path)["git_dirty"] is False
    (tmp_path / "results/c.json").write_text("1\n")
    (tmp_path / "RESULTS.md").write_text("1\n")
    assert code_identity(tmp_path)["git_dirty"] is False
    (tmp_path / "configs/b.yaml").write_text("1\n")
    assert code_identity(tmp_path)["git_dirty"] is True
