"""Nothing lost, nothing silent: run folders, locks, divergence, signals, kills, corrupt files, full disks.

Every test trains LeNet-5 on a few hundred MNIST images (seconds) and compares against an
uninterrupted run of the same config, bitwise (same process or OMP_NUM_THREADS=1 subprocesses).
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qtrain import fileio
from qtrain.errors import ConfigError, CorruptCheckpoint, Diverged, DiskError, Interrupted
from qtrain.run.runner import main_run, train_run
from qtrain.run.lifecycle import RunLock, unique_dir
from qtrain.store import checkpoint

QTRAIN = str(Path(sys.executable).parent / "qtrain")
SMALL = ["epochs=3", "data.limit_train=320", "data.limit_test=64", "data.batch_size=16", "abits=2"]
BCGD = ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true", "method.rho=0.01"]


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture
def small_cfg(make_cfg, mnist_root):
    return lambda *extra: make_cfg(*SMALL, f"data.root={mnist_root}", *extra)


# -- run folders and locks -------------------------------------------------------------------------


def test_unique_dir_never_shares_a_folder(tmp_path):
    # two processes asking for the same name in the same instant get two folders
    code = f"from qtrain.run.lifecycle import unique_dir; print(unique_dir({str(tmp_path / 'run')!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    names = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert len(set(names)) == 3 and all(Path(n).is_dir() for n in names)
    # in one process, the same name resolves to the same folder (Hydra resolves it more than once)
    assert unique_dir(str(tmp_path / "x")) == unique_dir(str(tmp_path / "x"))


def test_two_cli_runs_into_one_folder_name_get_two_folders(tmp_path, mnist_root):
    args = [QTRAIN, *SMALL, "epochs=1", "progress=false", "hydra.run.dir=${unique_dir:" + str(tmp_path / "same") + "}"]
    env = {**os.environ, "QTRAIN_DATA": mnist_root, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*args, f"optim.lr={lr}"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for lr in (0.1, 0.02)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("same*/result.json"))]
    assert sorted(r["config"]["optim"]["lr"] for r in results) == [0.02, 0.1]


def test_a_locked_run_folder_is_refused_with_the_holder_named(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released: free again
        pass


# -- divergence -------------------------------------------------------------------------------------


def test_divergence_stops_the_run_and_keeps_the_good_checkpoint(small_cfg, tmp_path):
    # epoch 1 trains normally, then the scheduler multiplies the lr by 1e12
    cfg = small_cfg("sched.milestones=[1]", "sched.gamma=1e12", "optim.lr=0.1")
    run = tmp_path / "run"
    with pytest.raises(Diverged) as e:
        train_run(cfg, run)
    assert "epoch 2" in str(e.value) and "epoch 1" in str(e.value)
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "diverged" and result["diverged_at"]["epoch"] == 2
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_divergence_exits_non_zero_from_the_command(tmp_path, mnist_root):
    r = subprocess.run([QTRAIN, *SMALL, "optim.lr=1e6", "progress=false", "out_dir=out"], cwd=tmp_path,
                       env={**os.environ, "QTRAIN_DATA": mnist_root}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    assert "diverged" in r.stderr and "Traceback" not in r.stderr
    (result,) = tmp_path.glob("out/runs/*/*/result.json")
    assert json.loads(result.read_text())["status"] == "diverged"


# -- signals: stop at the current step, resume to the same weights -----------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("method", [[], BCGD], ids=["float", "bcgd"])
def test_signal_mid_epoch_then_resume_is_bitwise_equal(small_cfg, tmp_path, monkeypatch, sig, code, method):
    cfg = small_cfg(*method)
    full = train_run(cfg, tmp_path / "outputs" / "full")

    from qtrain.train import loop as train

    real = train.DivergenceWatch.after_step

    def after_step(self, step, loss):  # a real signal, delivered after step 7 of epoch 2 (20 steps an epoch)
        real(self, step, loss)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 27:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(train.DivergenceWatch, "after_step", after_step)
    part = tmp_path / "outputs" / "part"
    with pytest.raises(Interrupted) as e:
        train_run(cfg, part)
    assert e.value.exit_code == code
    state = checkpoint.load(part / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["batches"] == 7
    assert state["partial"]["seconds"] > 0  # epoch 2's training time up to the signal
    # make it stand out: the resumed epoch's time must include it (the part before plus the rest)
    state["partial"]["seconds"] = before = 1000.0
    checkpoint.save(state, part / "checkpoints" / "last.pt", keep_previous=False)
    monkeypatch.undo()
    cfg.resume = True
    resumed = main_run(cfg, tmp_path / "outputs" / "new", {})
    assert resumed["run_dir"] == str(part)
    assert_same_weights(tmp_path / "outputs" / "full", part)
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert resumed["final_test_acc"] == full["final_test_acc"]
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["epoch"] == 2 and before < rows[1]["train/epoch_seconds"] < before + 60


def test_sigint_from_outside_prints_one_line_and_resumes(tmp_path, mnist_root):
    env = {**os.environ, "QTRAIN_DATA": mnist_root, "OMP_NUM_THREADS": "1"}
    args = [QTRAIN, "epochs=2", "data.limit_train=4000", "data.limit_test=64", "data.batch_size=8", "progress=false",
            "out_dir=out"]
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("out/runs/*/*/fingerprint.txt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "resume=" in err
    r = subprocess.run([*args, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (result,) = tmp_path.glob("out/runs/*/*/result.json")
    assert json.loads(result.read_text())["status"] == "complete"
    # the run's folder has the whole log: its first invocation's, then the resuming one's to the end
    (pointer,) = tmp_path.glob("out/runs/*/*/resumed_into.txt")
    log = (result.parent / "qtrain.log").read_text()
    assert "stopped by SIGINT" in log and "resuming" in log
    assert f"whose own log (from its start) is {pointer.parent / 'qtrain.log'}" in log
    assert "done: final test acc" in log
    assert "done: final test acc" in (pointer.parent / "qtrain.log").read_text()


# -- kill -9 at random moments (and between the checkpoint renames) ----------------------------------


def test_random_kills_then_resume_is_bitwise_equal(tmp_path, mnist_root):
    env = {**os.environ, "QTRAIN_DATA": mnist_root, "OMP_NUM_THREADS": "1"}
    args = [QTRAIN, *SMALL, "epochs=4", "data.limit_train=640", "progress=false", "out_dir=out", "seed=3"]
    started = time.monotonic()
    full = subprocess.run([*args, "out_dir=full"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    full_seconds = time.monotonic() - started
    assert full.returncode == 0, full.stderr
    rng = random.Random(0)
    kills = 0
    for _ in range(10):
        p = subprocess.Popen([*args, "resume=true"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # The kill lands somewhere in the run as this machine times it (start-up included): a fixed 2.5-5 s
        # missed every run on a fast CI machine, where the whole run took less than that.
        time.sleep(rng.uniform(0.3, 0.85) * full_seconds)
        if p.poll() is None:
            p.kill()
            kills += 1
        p.wait()
        if list(tmp_path.glob("out/runs/*/*/result.json")):
            if kills:
                break
            # it finished before any kill: the timed run was slower than this one (the fused kernel built on
            # first use, a loaded machine); start again from nothing, killing sooner
            shutil.rmtree(tmp_path / "out")
            full_seconds /= 2
    final = subprocess.run([*args, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert kills >= 1
    (done,) = [p.parent for p in tmp_path.glob("out/runs/*/*/result.json")]
    (ref,) = [p.parent for p in tmp_path.glob("full/runs/*/*/result.json")]
    assert_same_weights(ref, done)
    rows = [json.loads(x)["epoch"] for x in (done / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


class Crash(BaseException):
    """Stands for the process dying at that instant (not an Exception: nothing may catch it)."""


def test_crash_between_the_checkpoint_renames_resumes_equal(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg()
    train_run(cfg, tmp_path / "outputs" / "full")
    real_replace = os.replace
    calls = []

    def replace(src, dst):  # epoch 2's last.pt: moved to last.prev.pt, then the process dies
        calls.append(dst)
        if str(dst).endswith("last.prev.pt") and sum(str(c).endswith("last.prev.pt") for c in calls) == 2:
            real_replace(src, dst)
            raise Crash()
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    part = tmp_path / "outputs" / "part"
    with pytest.raises(Crash):
        train_run(cfg, part)
    monkeypatch.undo()
    assert not (part / "checkpoints" / "last.pt").exists()
    assert list((part / "checkpoints").glob(".last.pt.tmp-*"))  # the torn write's leftover
    cfg.resume = True
    main_run(cfg, tmp_path / "outputs" / "new", {})
    assert not list((part / "checkpoints").glob(".*.tmp-*"))  # stale temporary removed
    assert_same_weights(tmp_path / "outputs" / "full", part)
    best = checkpoint.load(part / "checkpoints" / "best.pt")
    assert best["epoch"] == json.loads((part / "result.json").read_text())["best_epoch"]


# -- corrupt files ----------------------------------------------------------------------------------


def _stopped_run(cfg, run, after=2):
    cfg.stop_after_epoch = after
    assert train_run(cfg, run)["status"] == "stopped"
    cfg.stop_after_epoch = None
    cfg.resume = str(run)


def test_truncated_last_checkpoint_falls_back_to_the_previous(small_cfg, tmp_path, caplog):
    cfg = small_cfg()
    train_run(cfg, tmp_path / "outputs" / "full")
    run = tmp_path / "outputs" / "part"
    _stopped_run(cfg, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    main_run(cfg, tmp_path / "outputs" / "new", {})
    assert "falling back" in caplog.text and "last.pt" in caplog.text
    assert_same_weights(tmp_path / "outputs" / "full", run)


def test_a_flipped_byte_in_a_tensor_is_detected(tmp_path):
    state = {"model": {"w": torch.arange(1000, dtype=torch.float32)}, "epoch": 1}
    path = tmp_path / "c.pt"
    checkpoint.save(state, path)
    raw = bytearray(path.read_bytes())
    detected = 0
    for seed in range(20):  # flip one byte anywhere: either unreadable or a checksum mismatch
        pos = random.Random(seed).randrange(len(raw))
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        state2, why = checkpoint.problem(path)
        if state2 is None:
            detected += 1
        else:  # a flip in zip padding or metadata that changes nothing loaded
            assert torch.equal(state2["model"]["w"], state["model"]["w"]) and state2["epoch"] == 1
    assert detected >= 10
    # a flip inside the tensor bytes is always caught
    path.write_bytes(bytes(raw))
    data = path.read_bytes()
    pos = data.index(torch.arange(1000, dtype=torch.float32).numpy().tobytes()[400:408]) + 3
    bad = bytearray(data)
    bad[pos] ^= 0x01
    path.write_bytes(bytes(bad))
    assert "checksum" in checkpoint.problem(path)[1]


def test_no_good_checkpoint_is_one_paragraph(small_cfg, tmp_path):
    cfg = small_cfg()
    run = tmp_path / "outputs" / "part"
    _stopped_run(cfg, run)
    for name in ("last.pt", "last.prev.pt"):
        (run / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpoint, match="No usable checkpoint"):
        main_run(cfg, tmp_path / "outputs" / "new", {})


def test_torn_metrics_row_is_dropped_on_resume(small_cfg, tmp_path):
    cfg = small_cfg()
    run = tmp_path / "outputs" / "part"
    _stopped_run(cfg, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train/lo')
    result = main_run(cfg, tmp_path / "outputs" / "new", {})
    assert result["status"] == "complete"
    rows = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_corrupt_cached_float_model_is_recomputed_identically(make_cfg, mnist_root, tmp_path):
    cfg = make_cfg(*SMALL, f"data.root={mnist_root}", "init=float", "epochs=1")
    first = train_run(cfg, tmp_path / "outputs" / "a")
    ckpt = Path(first["init"])
    good = checkpoint.load(ckpt)["model"]
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    second = train_run(cfg, tmp_path / "outputs" / "b")
    assert second["init"] == first["init"]
    again = checkpoint.load(ckpt)["model"]
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert_same_weights(tmp_path / "outputs" / "a", tmp_path / "outputs" / "b")


# -- full disk / read-only folder ------------------------------------------------------------------


def test_full_disk_is_one_message_and_recoverable(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg()
    train_run(cfg, tmp_path / "outputs" / "full")
    real_fsync = os.fsync
    count = [0]

    def fsync(fd):  # the 5th write (epoch 2's last.pt) finds the disk full
        count[0] += 1
        if count[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    run = tmp_path / "outputs" / "part"
    with pytest.raises(DiskError) as e:
        train_run(cfg, run)
    msg = str(e.value)
    assert "disk is full" in msg and str(run) in msg and "MiB" in msg and "resume" in msg
    monkeypatch.undo()
    assert not list(run.glob("**/.*.tmp-*"))
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] >= 1
    cfg.resume = True
    assert main_run(cfg, tmp_path / "outputs" / "new", {})["status"] == "complete"
    assert_same_weights(tmp_path / "outputs" / "full", run)


def test_file_size_limit_from_the_os_is_a_clear_error(tmp_path, mnist_root):
    import resource

    def limit():  # a real OS refusal (EFBIG) for any file over 100 kB: the checkpoints are ~500 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([QTRAIN, *SMALL, "progress=false", "out_dir=out"], cwd=tmp_path, preexec_fn=limit,
                       env={**os.environ, "QTRAIN_DATA": mnist_root}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Could not write best.pt" in r.stderr and "size limit" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out/**/.*.tmp-*"))


# -- resume refuses another config; the dataset is part of a run's identity -------------------------


def test_resume_with_another_config_is_refused_naming_the_keys(small_cfg, tmp_path):
    cfg = small_cfg()
    run = tmp_path / "outputs" / "part"
    _stopped_run(cfg, run)
    for key, value in (("optim", {"lr": 0.5}), ("method", {"_target_": "qtrain.methods.BinaryRelax"})):
        other = small_cfg()
        other.resume = str(run)
        from omegaconf import OmegaConf, open_dict

        with open_dict(other):
            other[key] = OmegaConf.merge(other[key], value)
        with pytest.raises(ConfigError, match=key):
            main_run(other, tmp_path / "outputs" / "new", {})
    # the run itself is untouched and still resumes with its own config
    assert main_run(cfg, tmp_path / "outputs" / "new2", {})["status"] == "complete"


def test_completed_run_of_another_model_is_not_returned(make_cfg, mnist_root, tmp_path):
    done = train_run(make_cfg(*SMALL, f"data.root={mnist_root}", "epochs=1"), tmp_path / "outputs" / "lenet")
    other = make_cfg(*SMALL, f"data.root={mnist_root}", "epochs=1", "model=resnet20", f"resume={done['run_dir']}")
    with pytest.raises(ConfigError, match="model"):
        main_run(other, tmp_path / "outputs" / "new", {})


def test_dataset_identity_is_content_not_location(make_cfg, mnist_root, tmp_path, monkeypatch):
    import shutil

    from qtrain.run.resume import fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(Path(mnist_root) / "MNIST", copy / "MNIST")
    base = fingerprint(make_cfg(f"data.root={mnist_root}"))
    assert fingerprint(make_cfg(f"data.root={copy}")) == base
    # another dataset in the same format: one label changed
    labels = copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    import gzip

    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    assert fingerprint(make_cfg(f"data.root={copy}")) != base
    assert not list(Path(mnist_root).rglob(".*tmp*"))  # nothing written into the data root


def test_resume_with_another_thread_count_warns(small_cfg, tmp_path, caplog):
    cfg = small_cfg()
    run = tmp_path / "outputs" / "part"
    _stopped_run(cfg, run)
    path = run / "checkpoints" / "last.pt"
    state = checkpoint.load(path)
    state["threads"] = torch.get_num_threads() + 3  # as if trained with more threads
    checkpoint.save(state, path, keep_previous=False)
    main_run(cfg, tmp_path / "outputs" / "new", {})
    assert "threads" in caplog.text and "OMP_NUM_THREADS" in caplog.text
