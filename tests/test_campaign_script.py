"""scripts/cifar_campaign.sh status, on a stand-in output folder: a run is listed from its start (before
its first epoch ends), and says whether it is done, training now (its run lock is held) or stopped."""

import os
import subprocess
from pathlib import Path

from qtrain.run.lifecycle import RunLock

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cifar_campaign.sh"


def make_run(root: Path, name: str, epochs: int, done: bool = False) -> Path:
    d = root / "runs" / "cifar10_resnet20_float_wfa4_identity" / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(  # as the lane starts it: the cell's own overrides, then every cell's
        "- experiment=ste/cifar10_resnet20_a4_identity\n- schedule_scale=0.1\n- seed=1\n- resume=true\n"
        "- out_dir=outputs/cifar\n- progress=false\n")
    (d / "fingerprint.txt").write_text("0123\n")  # qtrain writes it before the first epoch
    if epochs:
        (d / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}, "test/acc": {30 + e}.5}}\n'
                                                 for e in range(1, epochs + 1)))
    if done:
        (d / "result.json").write_text("{}")
    return d


def status(out: Path) -> list[str]:
    env = {**os.environ, "CAMPAIGN_OUT": str(out)}
    p = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_status_lists_runs_from_their_start_with_their_state(tmp_path):
    make_run(tmp_path, "s1_a_done", 20, done=True)
    make_run(tmp_path, "s1_b_stopped", 3)
    starting = make_run(tmp_path, "s1_c_starting", 0)
    with RunLock(starting):  # as the qtrain that has just started there holds it
        lines = status(tmp_path)
    runs = {line.split()[0].rsplit("/", 1)[1]: line for line in lines if line.startswith("runs/")}
    assert "20 epochs  test acc 50.5" in runs["s1_a_done"] and runs["s1_a_done"].endswith("done")
    assert "3 epochs  test acc 33.5" in runs["s1_b_stopped"] and "stopped (resumes with start)" in runs["s1_b_stopped"]
    assert "0 epochs  test acc -" in runs["s1_c_starting"] and runs["s1_c_starting"].endswith("training now")
    assert lines.count("    experiment=ste/cifar10_resnet20_a4_identity seed=1") == 3


def test_start_refuses_a_qtrain_that_does_not_run_before_any_lane_starts(tmp_path):
    """A broken venv (console scripts whose #! names a python that is gone) once failed every cell of both
    queues in a second; `start` now checks qtrain first and exits 2, naming the fix, with no lane started."""
    broken = tmp_path / "qtrain"
    broken.write_text("#!/nonexistent/python\n")
    broken.chmod(0o755)
    env = {**os.environ, "CAMPAIGN_OUT": str(tmp_path / "out"), "CAMPAIGN_KEEP": str(tmp_path / "keep"),
           "CAMPAIGN_QTRAIN": str(broken)}
    p = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "does not run" in p.stderr and "make install" in p.stderr
    assert not list((tmp_path / "out").glob("lane_*"))  # no pid file, no log: nothing started
