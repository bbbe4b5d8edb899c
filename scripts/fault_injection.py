"""Kill a training run with SIGKILL at random moments, resume it each time, and check that the run
that finally completes has exactly the weights of an uninterrupted run (OMP_NUM_THREADS=1).

    python scripts/fault_injection.py --kills 30          # LeNet-5 / MNIST subset, ~5 minutes

The kills land anywhere: start-up, mid-epoch, inside a checkpoint write, between the renames.
Prints the number of kills survived and whether the final weights are torch.equal.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QTRAIN = str(Path(sys.executable).parent / "qtrain")
ARGS = ["epochs=6", "data.limit_train=960", "data.limit_test=64", "data.batch_size=16", "abits=2", "method=bcgd",
        "wbits=1", "act.learn_alpha=true", "method.rho=0.01", "progress=false", "seed=5"]


def final_weights(out: Path) -> dict:
    (result,) = out.glob("runs/*/*/result.json")
    return torch.load(result.parent / "checkpoints" / "last.pt", weights_only=False)["model"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([QTRAIN, *ARGS, f"out_dir={tmp / 'ref'}"], env=env, check=True, capture_output=True)
        kills = restarts = 0
        while kills < args.kills:
            if list((tmp / "run").glob("runs/*/*/result.json")):  # finished before all kills: start over
                final = final_weights(tmp / "run")
                ref = final_weights(tmp / "ref")
                assert all(torch.equal(final[k], ref[k]) for k in ref), "weights differ"
                restarts += 1
                os.rename(tmp / "run", tmp / f"done{restarts}")
            proc = subprocess.Popen([QTRAIN, *ARGS, f"out_dir={tmp / 'run'}", "resume=true"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.5, 8.0))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
        subprocess.run([QTRAIN, *ARGS, f"out_dir={tmp / 'run'}", "resume=true"], env=env, check=True,
                       capture_output=True)
        final, ref = final_weights(tmp / "run"), final_weights(tmp / "ref")
        equal = all(torch.equal(final[k], ref[k]) for k in ref)
        print(f"{kills} SIGKILLs survived over {restarts + 1} complete runs; every completed run's final weights "
              f"torch.equal to the uninterrupted run: {equal}")
        sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
