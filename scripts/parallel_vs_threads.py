"""Do two training processes with 1 thread each finish more work per hour than one with 2 threads?

Runs `qtrain-bench` (a4 ResNet-20 steps by default) three ways on this machine, one after the
other: one process with --threads 2, then two processes side by side with --threads 1 each. It
prints images/s of each arrangement and their ratio; the campaign (RESULTS.md) uses the winner.

    python scripts/parallel_vs_threads.py --json docs/bench/parallel_vs_threads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(threads: int, out: Path, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qtrain.tools.bench", "--model", "resnet20", "--data", "cifar10", "--batch-size", "128",
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", "2", "--no-data",
           "--threads", str(threads), "--variants", "float", args.variant, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def rate(path: Path, variant: str) -> float:
    rows = json.loads(path.read_text())["steps"]
    return next(r["images_per_s"] for r in rows if r["variant"] == variant)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="a4 (float weights)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp, "one.json")
        if bench(2, one, args).wait() != 0:
            sys.exit("the 2-thread benchmark failed")
        two = [Path(tmp, f"two{i}.json") for i in range(2)]
        procs = [bench(1, path, args) for path in two]
        if any(proc.wait() != 0 for proc in procs):
            sys.exit("a 1-thread benchmark failed")
        result = {"variant": args.variant,
                  "one_process_2_threads_images_per_s": rate(one, args.variant),
                  "two_processes_1_thread_images_per_s": [rate(path, args.variant) for path in two]}
    total = sum(result["two_processes_1_thread_images_per_s"])
    result["ratio_two_processes_over_one"] = total / result["one_process_2_threads_images_per_s"]
    result["command"] = "python scripts/parallel_vs_threads.py " + " ".join(sys.argv[1:])
    print(f"{args.variant}, ResNet-20 batch 128: one process x 2 threads "
          f"{result['one_process_2_threads_images_per_s']:.0f} img/s; two processes x 1 thread "
          f"{total:.0f} img/s together ({result['ratio_two_processes_over_one']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
