"""How close a data-parallel run is to a single-process one (docs/SCALING.md, "Scaling out"), on the CPU.

    python scripts/ddp_equivalence.py [DATA_ROOT]

1. Lock-step (tests/ddp_lockstep.py): from the same state, one devices=2 step (sync_bn) against one
   single-process step on the same global batch, for float / ste / binaryrelax / bcgd (LeNet-5,
   1,301 MNIST samples, 2 epochs = 42 steps, uneven last batch): the largest difference in any
   weight or buffer after a step, the median over steps, and whether the ranks held bitwise the same
   state after every step.
2. End to end, 200 steps (LeNet-5 float, lr 0.01, 3,200 samples, 4 epochs): the largest weight/buffer
   difference between devices=1 and devices=2, beside the one between devices=1 with 1 and with 2
   threads (the same computation, only the float summation order differs).
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _largest_difference(a: Path, b: Path) -> tuple[float, str]:
    sa, sb = (torch.load(p, weights_only=False)["model"] for p in (a, b))
    return max((float((sa[k].double() - sb[k].double()).abs().max()), k) for k in sa if sa[k].is_floating_point())


def end_to_end(data: str) -> dict:
    base = ["abits=null", "optim.lr=0.01", "data.limit_train=3200", "data.limit_test=500", "epochs=4",
            "channels_last=false", "progress=false"]
    runs = {"devices=1, 1 thread": ([], "1"), "devices=1, 2 threads": ([], "2"),
            "devices=2 sync_bn, 1 thread each": (["devices=2", "sync_bn=true"], "1")}
    ckpt = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, threads) in runs.items():
            out = Path(tmp) / str(len(ckpt))
            env = {**os.environ, "QTRAIN_DATA": data, "OMP_NUM_THREADS": threads}
            subprocess.run([str(Path(sys.executable).parent / "qtrain"), *base, *extra, f"out_dir={out}"], env=env,
                           check=True, capture_output=True)
            (ckpt[name],) = glob.glob(str(out / "runs/*/*/checkpoints/last.pt"))
        ref = ckpt["devices=1, 1 thread"]
        return {name: _largest_difference(Path(ref), Path(p)) for name, p in ckpt.items() if p != ref}


def main() -> None:
    from tests.ddp_lockstep import run_lockstep

    data = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("QTRAIN_DATA", str(ROOT.parent / "shared" / "data"))
    common = [f"data.root={data}", "data.limit_train=1301", "data.limit_test=100", "epochs=2", "channels_last=false"]
    cases = {"float": common + ["abits=null"], "ste (w1, a2)": common + ["method=ste", "wbits=1"],
             "binaryrelax (w1, a2)": common + ["method=binaryrelax", "wbits=1", "method.phase2_epoch=1"],
             "bcgd (w1, a4, learned alpha)": common + ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true"]}
    with tempfile.TemporaryDirectory() as tmp:
        report = run_lockstep(cases, str(Path(tmp) / "lockstep.json"), 29600 + os.getpid() % 300)
    print("| method | steps | largest difference after a step | median over steps | steps > 1e-5 | ranks identical |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        steps = r["per_step"]
        print(f"| {name} | {r['steps']} | {r['max_abs_difference']:.2g} ({r['where']}) | {statistics.median(steps):.2g} "
              f"| {sum(s > 1e-5 for s in steps)} | {r['ranks_identical']} |")
    print("\nEnd to end, 200 steps, largest difference from devices=1 with 1 thread:")
    for name, (diff, key) in end_to_end(data).items():
        print(f"- {name}: {diff:.2g} ({key})")
    print(json.dumps({"torch": torch.__version__}))


if __name__ == "__main__":
    main()
