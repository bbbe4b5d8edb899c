"""Part 13's rough edges, each tried as a user would: an added key nothing reads, a run folder that
cannot be written, step logging (test_tensorboard.py), and every command with missing or bad input."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.errors import ConfigError
from qtrain import fileio
from qtrain.run.runner import main_run, train_run

BIN = Path(sys.executable).parent
TINY = ["epochs=2", "data.limit_train=64", "data.limit_test=32", "data.batch_size=32", "progress=false"]


def run(cmd, cwd, data=None, **kw):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **({"QTRAIN_DATA": data} if data else {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


# -- a key added on the command line that nothing reads ------------------------------------------------


@pytest.mark.parametrize("given,meant", [("+epoch=1", "epochs"), ("+seeds=3", "seed"), ("+act.alpah=0.5", "act.alpha")])
def test_a_typo_of_a_known_key_is_refused_naming_the_key(tmp_path, given, meant):
    r = run([str(BIN / "qtrain"), given, "out_dir=out"], tmp_path)
    assert r.returncode == 2, r.stderr
    said = " ".join(r.stderr.split())
    assert f"did you mean {meant}?" in said and "Traceback" not in said
    assert not (tmp_path / "out" / "runs").exists() or not list((tmp_path / "out" / "runs").rglob("metrics.jsonl"))


def test_an_unread_key_is_named_in_a_warning_before_training(tmp_path, mnist_root):
    r = run([str(BIN / "qtrain"), "+my_note=hello", *TINY, "out_dir=out"], tmp_path, data=mnist_root)
    assert r.returncode == 0, r.stderr
    warning = "+my_note: no part of qtrain reads this key"
    (log,) = [p.read_text() for p in (tmp_path / "out" / "runs").rglob("qtrain.log")]
    assert warning in log and log.index(warning) < log.index("epoch 1 |")  # said before training


def test_free_nodes_stay_free(make_cfg):
    from qtrain.run.validate import check_added_keys

    assert check_added_keys(["++pretrain.epochs=1", "+pretrain.seed=0", "+paper.note=x", "+hydra.job.env_set.A=1",
                             "+data.extra=1", "epochs=3"]) == []


# -- a run folder that cannot be written ----------------------------------------------------------------


@pytest.fixture
def stopped_run(make_cfg, mnist_root, tmp_path):
    cfg = make_cfg(*TINY, f"data.root={mnist_root}", "stop_after_epoch=1")
    folder = tmp_path / "outputs" / "runs" / "r"
    assert train_run(cfg, folder)["status"] == "stopped"
    return cfg, folder


def test_resuming_into_a_folder_that_cannot_be_written_is_one_paragraph(stopped_run, tmp_path, monkeypatch):
    cfg, folder = stopped_run
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only mount answers every attempt to create a file there
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fileio.os, "open", read_only)
    cfg.resume, cfg.stop_after_epoch = str(folder), None
    with pytest.raises(ConfigError) as e:
        main_run(cfg, tmp_path / "outputs" / "new", {})
    text = str(e.value)
    assert f"the run folder {folder} cannot be written (Read-only file system)" in text
    assert f"cp -r {folder}" in text and f"qtrain-eval {folder}" in text
    assert not (folder / "result.json").exists()


def test_the_qtrain_command_on_a_read_only_mount(stopped_run, tmp_path, mnist_root):
    """The real thing: the run folder on a read-only bind mount (a private mount namespace, as root)."""
    cfg, folder = stopped_run
    if shutil.which("unshare") is None or run(["unshare", "--mount", "true"], tmp_path).returncode != 0:
        pytest.skip("no private mount namespace here (unshare --mount needs root)")
    qtrain = " ".join([str(BIN / "qtrain"), f"resume={folder}", *TINY, f"data.root={mnist_root}",
                       f"out_dir={tmp_path / 'outputs'}"])
    script = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec {qtrain}"
    r = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], tmp_path)
    assert r.returncode == 2, r.stderr
    said = " ".join(r.stderr.split())  # (the CLI wraps its paragraph)
    assert f"the run folder {folder} cannot be written (Read-only file system)" in said and "Traceback" not in said
    assert f"qtrain-eval {folder}" in said


# -- every command, with missing or bad input: one paragraph, exit 2 ------------------------------------


def bench(*args):
    return [str(BIN / "qtrain-bench"), "--model", "lenet5", "--data", "mnist", "--batch-size", "16", "--steps", "1",
            "--warmup", "1", "--rounds", "1", "--variants", "float", *args]


def test_bench_times_steps_without_reading_the_dataset(tmp_path):
    r = run(bench("--no-data", "--data-root", str(tmp_path / "nowhere"), "--json", "b.json"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "b.json").exists()


def test_every_command_says_what_is_wrong_with_its_input(stopped_run, tmp_path):
    _, folder = stopped_run
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    damaged = tmp_path / "results" / "runs" / "x"
    damaged.mkdir(parents=True)
    (damaged / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (damaged / "result.json").write_text('{"status": "comp')
    nowhere = str(tmp_path / "nowhere")
    cases = {
        "bench, dataset missing": (bench("--data-root", nowhere), "MNIST was not found"),
        "bench --ddp, dataset missing": ([str(BIN / "qtrain-bench"), "--ddp", "--rounds", "1", "--data-root", nowhere],
                                         "MNIST was not found"),
        "eval, no such run": ([str(BIN / "qtrain-eval"), nowhere], "no such checkpoint"),
        "eval, not a checkpoint": ([str(BIN / "qtrain-eval"), str(tmp_path / "garbage.pt")], "garbage.pt"),
        "eval, dataset missing": ([str(BIN / "qtrain-eval"), str(folder), "--data-root", nowhere], "MNIST was not found"),
        "export, no such run": ([str(BIN / "qtrain-export"), nowhere], "no such checkpoint"),
        "export, dataset missing": ([str(BIN / "qtrain-export"), str(folder), "--data-root", nowhere, "--out",
                                     str(tmp_path / "e")], "MNIST was not found"),
        "report, no such folder": ([str(BIN / "qtrain-report"), nowhere], "no such folder"),
        "report, damaged result.json": ([str(BIN / "qtrain-report"), str(tmp_path / "results")], "is not valid JSON"),
    }
    for what, (cmd, says) in cases.items():
        r = run(cmd, tmp_path)
        said = " ".join(r.stderr.split())
        assert r.returncode == 2, f"{what}: exit {r.returncode}\n{r.stderr}"
        assert says in said and "Traceback" not in said, f"{what}: {r.stderr}"
