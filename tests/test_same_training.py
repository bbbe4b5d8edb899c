"""Refactoring leaves training bitwise as it was: a short run of each method ends with exactly the
checkpoint (model, optimizer and method state) recorded in tests/golden/short_runs.json before the
package restructure (part 11). The golden hashes are of one torch version on one CPU instruction set
(float kernels differ between AVX2 and AVX-512); elsewhere the test skips and says why.

    QTRAIN_WRITE_GOLDEN=1 pytest tests/test_same_training.py    re-record (only for an intended change)
"""

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from qtrain.run.runner import train_run

GOLDEN = Path(__file__).parent / "golden" / "short_runs.json"
SHORT = ["epochs=2", "data.limit_train=96", "data.limit_test=32", "data.batch_size=32", "log_every_n_steps=1"]
METHODS = {
    "float": ["method=float", "abits=2"],
    "ste": ["method=ste", "wbits=1", "abits=2"],
    "binaryrelax": ["method=binaryrelax", "wbits=2", "abits=4", "method.phase2_epoch=1"],
    "bcgd_learned_alpha": ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true", "method.rho=0.01"],
}


def machine() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "arch": platform.machine()}


def state_hash(obj, h=None):
    """sha256 over every tensor (dtype, shape, bytes) and plain value of a checkpoint, in key order."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            state_hash(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            state_hash(v, h)
    else:
        h.update(repr(obj).encode())
    return h


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction's order may depend on the thread count
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", METHODS)
def test_a_short_run_ends_with_the_recorded_checkpoint(make_cfg, mnist_root, tmp_path, one_thread, method):
    cfg = make_cfg(*SHORT, *METHODS[method], f"data.root={mnist_root}")
    assert train_run(cfg, tmp_path / "run")["status"] == "complete"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    got = {k: state_hash(state[k]).hexdigest() for k in ("model", "optimizer", "scheduler", "method")}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"machine": machine(), "runs": {}}
    if os.environ.get("QTRAIN_WRITE_GOLDEN"):
        golden = {"machine": machine(), "runs": {**golden["runs"], method: got}} if golden["machine"] == machine() \
            else {"machine": machine(), "runs": {method: got}}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    if golden["machine"] != machine():
        pytest.skip(f"the golden checkpoints were recorded with {golden['machine']}, this is {machine()}")
    assert got == golden["runs"][method]
