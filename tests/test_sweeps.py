"""Hydra's sweepers and launchers as users use them: an Optuna search, the joblib launcher, and the
summary table every multirun ends with."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

QTRAIN = str(Path(sys.executable).parent / "qtrain")
TINY = ["epochs=1", "data.limit_train=256", "data.limit_test=128", "progress=false", "out_dir=out"]


def run(*args, cwd, data):
    env = {**os.environ, "QTRAIN_DATA": data, "OMP_NUM_THREADS": "1"}
    return subprocess.run([QTRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_optuna_search_uses_the_returned_objective(tmp_path, mnist_root):
    r = run("hparams_search=bcgd_rho", "hydra.sweeper.n_trials=2", *TINY, cwd=tmp_path, data=mnist_root)
    assert r.returncode == 0, r.stderr
    (sweep,) = (tmp_path / "out" / "multirun").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"method.rho", "optim.lr"}
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 2 and all(row["status"] == "complete" for row in rows)
    assert best["best_value"] == max(float(row["best_test_acc"]) for row in rows)
    assert "method.rho=" in (sweep / "summary.md").read_text()


def test_joblib_launcher_reports_a_failed_job_and_exits_non_zero(tmp_path, mnist_root):
    r = run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "abits=0,2", *TINY, cwd=tmp_path,
            data=mnist_root)
    assert r.returncode == 1
    assert "did not complete" in r.stderr and "abits=0" in r.stderr
    (sweep,) = (tmp_path / "out" / "multirun").iterdir()
    rows = {row["overrides"].split()[0]: row["status"] for row in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows["abits=2"] == "complete" and rows["abits=0"] != "complete"


def test_rerunning_a_finished_sweep_with_resume_reports_every_job_complete(tmp_path, mnist_root):
    # The campaign workflow: start the same sweep again with resume=true. Nothing is retrained, and the
    # new sweep's table and exit status come from the runs the first sweep finished.
    for attempt in (1, 2):
        r = run("-m", "abits=2,4", "resume=true", *TINY, cwd=tmp_path, data=mnist_root)
        assert r.returncode == 0, (attempt, r.stderr)
    first, second = sorted((tmp_path / "out" / "multirun").iterdir())
    rows = {row["job"]: row for row in csv.DictReader(open(second / "summary.csv"))}
    assert {row["status"] for row in rows.values()} == {"complete"}
    originals = {row["run_dir"] for row in csv.DictReader(open(first / "summary.csv"))}
    assert {row["run_dir"] for row in rows.values()} == originals  # the first sweep's runs, not retrained
    for job in second.iterdir():
        if job.is_dir() and (job / ".hydra").is_dir():
            assert not (job / "result.json").exists()
            assert (job / "resumed_into.txt").read_text().strip() in originals


def test_qtrain_eval_reproduces_the_runs_own_test_accuracy(tmp_path, mnist_root):
    import json

    r = run("method=bcgd", "wbits=1", "abits=4", *TINY, cwd=tmp_path, data=mnist_root)
    assert r.returncode == 0, r.stderr
    (result,) = tmp_path.glob("out/runs/*/*/result.json")
    expected = json.loads(result.read_text())
    out = subprocess.run([str(Path(QTRAIN).parent / "qtrain-eval"), str(result.parent), "--json", "e.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["test_acc"] == expected["final_test_acc"] and got["test_loss"] == expected["final_test_loss"]
    bad = subprocess.run([str(Path(QTRAIN).parent / "qtrain-eval"), str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_submitit_local_sweep_runs_jobs_and_reports_a_failure(tmp_path, mnist_root):
    r = run("-m", "hydra/launcher=submitit_local", "abits=0,2", *TINY, cwd=tmp_path, data=mnist_root)
    assert r.returncode == 1, r.stderr
    assert "did not complete" in r.stderr and "abits=0" in r.stderr
    (sweep,) = (tmp_path / "out" / "multirun").iterdir()
    rows = {row["overrides"].split()[0]: row["status"] for row in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows == {"abits=0": "failed or incomplete (see its qtrain.log)", "abits=2": "complete"}


def test_slurm_launcher_config_composes(tmp_path):
    r = run("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj", "--cfg", "hydra",
            cwd=tmp_path, data=str(tmp_path))
    assert r.returncode == 0, r.stderr
    launcher = yaml.safe_load(r.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["account"] == "proj" and launcher["max_num_timeout"] == 3
