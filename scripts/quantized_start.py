"""Where a quantized cell starts: the test accuracy of its float model with the cell's quantizers
put in, before any quantization-aware training (epoch 0 of the cell's curve).

    python scripts/quantized_start.py experiment=ste/cifar10_resnet20_a2_clipped_relu schedule_scale=0.1 \
        out_dir=outputs/cifar [act.alpha=optimal] [--json start.json]

The arguments are the cell's own overrides, so the float model is the one the cell's init=float uses
(found by the same fingerprint; it must exist: this script never trains). The evaluation is the one
a run logs as test/acc (hard-quantized weights Q(w) where the method quantizes weights). Comparing
this number with the cell's final accuracy says how much the quantization-aware epochs recovered,
and trying act.alpha= values says how much the activation clip level alone is worth at the start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qtrain.errors import QtrainError


def quantized_start(overrides: list[str]) -> dict:
    from qtrain.run.build import pick_device
    from qtrain.tools.eval import load_start
    from qtrain.train.loop import evaluate

    cfg, built, run_dir = load_start(overrides)  # the float model the cell's init=float uses
    ckpt = run_dir / "checkpoints" / "last.pt"
    data, model, method, task, device = built.data, built.model, built.method, built.task, pick_device("cpu")
    name, context = method.evaluations()[0]  # what the run logs as test/acc
    with context:
        quantized = evaluate(model, data.test, task, device)
    float_result = json.loads((run_dir / "result.json").read_text())
    return {"overrides": overrides, "float_model": str(ckpt), "float_test_acc": float_result["final_test_acc"],
            "quantized_start_test_acc": quantized["acc"], "quantized_start_test_loss": quantized["loss"],
            "evaluated_as": name, "abits": cfg.abits, "wbits": cfg.wbits, "alpha": cfg.act.alpha,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="+", help="the cell's overrides, as given to qtrain")
    p.add_argument("--json", type=Path, help="also append the result, one JSON object per line")
    args = p.parse_args(argv)
    try:
        out = quantized_start(args.overrides)
    except QtrainError as e:
        print(f"quantized_start: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    line = json.dumps(out)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
