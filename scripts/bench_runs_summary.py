"""Median and spread of several `qtrain-bench --json` runs, as the Markdown table in docs/BENCHMARKS.md.

    python scripts/bench_runs_summary.py docs/bench/steps_cifar10_resnet20_fused_run*.json

Each run already gives, per variant, the median over its interleaved rounds of the step time as a ratio to
the plain-PyTorch floor measured in the same run; this prints the median of those ratios over the runs, with
their range (min-max), and the median step time.
"""

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    runs = [json.loads(open(p).read()) for p in paths]
    print(f"# {len(runs)} runs: {', '.join(paths)}\n# {runs[0]['info']['machine']}, torch {runs[0]['info']['torch']}")
    print("| variant | median step (ms) | × plain PyTorch, median | range over runs |\n|---|---|---|---|")
    for i, row in enumerate(runs[0]["steps"]):
        ratios = [run["steps"][i]["ratio_to_plain"] for run in runs]
        ms = statistics.median(run["steps"][i]["median_step_ms"] for run in runs)
        print(f"| {row['variant']} | {ms:.1f} | {statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
