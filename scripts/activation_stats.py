"""Where the inputs of a model's quantized activations fall, relative to the staircase and its STEs.

    python scripts/activation_stats.py run <run folder> [<run folder> ...] [--limit-test 2000] [--json out.jsonl]
    python scripts/activation_stats.py start experiment=ste/cifar10_resnet20_a2_relu schedule_scale=0.1 \
        pretrain.schedule_scale=1 out_dir=outputs/cifar_full [--json out.jsonl]

``run``: trained cells (each one's verified checkpoint, rebuilt as qtrain-eval does). ``start``: the cell's float
model with the cell's quantizers put in, before any quantization-aware training (as quantized_start.py).

The three [STE] estimators share the forward pass (the b-bit staircase, 0 below 0 and (2^b-1) alpha above
its top) and differ only in where they let the gradient through: identity everywhere, relu for x > 0,
clipped_relu for 0 < x <= top. So for each quantized activation the script counts the fraction of its
inputs in each region: ``below`` (x <= 0: only identity passes a gradient there), ``inside`` (all three),
``above`` (x > top: identity and relu pass one, clipped_relu does not; the forward is flat there). It
also gives the mean and standard deviation of the inputs, the share of each output level, and per layer the
channels that are "off" (>= 99 % of their inputs <= 0: relu and clipped_relu pass them almost no gradient)
or "saturated" (>= 50 % above the top), since a total can hide a few channels stuck at either end. The
totals are weighted by element count, and split by where the activation sits in a ResNet block: after
a batch norm (``act1``, the stem) or after a batch norm plus the shortcut (``act2``), whose inputs are
shifted up by the previous block's (non-negative) output.

The test images are used, without augmentation, with the batch norm's running statistics (the model as
its test accuracy sees it); ``--batch-stats`` normalises each batch by its own statistics instead, as
the training forward does (the running statistics are not changed on disk: nothing is saved).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qtrain.errors import QtrainError

def _position(name: str) -> str:
    """'act2' for a block's second activation (after BN + shortcut), else 'act1' (after a BN only)."""
    return "act2" if name.endswith("act2") else "act1"


#: a channel is "off" when at least this fraction of its inputs is <= 0 (the relu and clipped_relu STEs pass
#: it almost no gradient), "saturated" when at least this fraction is above the staircase's top
OFF, SATURATED = 0.99, 0.5


class RegionCounter:
    """Accumulates, per QuantReLU, the counts of its inputs below 0 / inside the staircase / above its top."""

    def __init__(self, model):
        from qtrain.quant.act import QuantReLU

        self.layers = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, QuantReLU):
                self.layers[name] = {"bits": m.bits, "alpha": float(m.alpha), "n": 0, "below": 0, "above": 0, "sum": 0.0, "sumsq": 0.0, "levels": [0] * (2**m.bits),
                                     "channel_below": 0, "channel_above": 0, "channel_n": 0}
                # a pre-hook sees the input before the fused in-place kernel writes the levels over it
                self.handles.append(m.register_forward_pre_hook(self._hook(name, m)))
        if not self.layers:
            raise QtrainError("the model has no quantized activation (abits=null?): nothing to count.")

    def _hook(self, name, module):
        def hook(_, args):
            x = args[0].detach().double()
            s = self.layers[name]
            alpha, top_level = float(module.alpha), 2**module.bits - 1
            top = top_level * alpha
            s["n"] += x.numel()
            s["below"] += int((x <= 0).sum())
            s["above"] += int((x > top).sum())
            s["sum"] += float(x.sum())
            s["sumsq"] += float((x * x).sum())
            k = torch.ceil(x / alpha) if module.rounding == "ceil" else torch.floor(x / alpha + 0.5)
            counts = torch.bincount(k.clamp(0, top_level).long().flatten(), minlength=top_level + 1)
            s["levels"] = [a + int(b) for a, b in zip(s["levels"], counts)]
            if x.dim() >= 2:  # per channel (dim 1), for the channels that are (nearly) always off or saturated
                dims = [d for d in range(x.dim()) if d != 1]
                s["channel_below"] = s["channel_below"] + (x <= 0).sum(dims)
                s["channel_above"] = s["channel_above"] + (x > top).sum(dims)
                s["channel_n"] += x.numel() // x.shape[1]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def summary(self) -> dict:
        def frac(s):
            n = s["n"]
            mean = s["sum"] / n
            return {"bits": s["bits"], "alpha": s["alpha"], "top": (2**s["bits"] - 1) * s["alpha"], "elements": n,
                    "below": s["below"] / n, "inside": (n - s["below"] - s["above"]) / n, "above": s["above"] / n,
                    "mean": mean, "std": max(s["sumsq"] / n - mean * mean, 0.0) ** 0.5,
                    "levels": [c / n for c in s["levels"]], **channels(s)}

        def channels(s):
            if not s["channel_n"]:
                return {}
            below, above = s["channel_below"] / s["channel_n"], s["channel_above"] / s["channel_n"]
            return {"channels": int(below.numel()), "channels_off": int((below >= OFF).sum()),
                    "channels_saturated": int((above >= SATURATED).sum()),
                    "channel_above_max": float(above.max())}

        layers = {name: frac(s) for name, s in self.layers.items()}
        groups = {}
        for pos in ("act1", "act2", "all"):
            names = [name for name in self.layers if pos == "all" or _position(name) == pos]
            if names:
                n = sum(self.layers[m]["n"] for m in names)
                below, above = (sum(self.layers[m][k] for m in names) for k in ("below", "above"))
                group = {"below": below / n, "inside": (n - below - above) / n, "above": above / n}
                group["layers"] = len(names)
                group.update({k: sum(layers[m].get(k, 0) for m in names)
                              for k in ("channels", "channels_off", "channels_saturated")})
                groups[pos] = group
        return {"layers": layers, "groups": groups}


@torch.no_grad()
def count_regions(model, batches, device, context, batch_stats: bool = False) -> dict:
    counter = RegionCounter(model)
    model.train(batch_stats)
    saved = {k: v.clone() for k, v in model.state_dict().items()} if batch_stats else None
    try:
        with context:
            for x, _ in batches:
                model(x.to(device))
    finally:
        counter.close()
        if saved is not None:  # the batch-statistics forward moved the running statistics: put them back
            model.load_state_dict(saved)
        model.eval()
    return counter.summary()


def stats_of_run(path: Path, limit_test: int | None, batch_stats: bool) -> dict:
    from qtrain.tools.eval import load_run

    ckpt, state, cfg, data, model, names, method, task = load_run(path, limit_test=limit_test)
    _, context = method.evaluations()[0]  # the weights the run's test/acc uses (Q(w) where it quantizes)
    out = count_regions(model, data.test, torch.device("cpu"), context, batch_stats)
    return {"what": "run", "checkpoint": str(ckpt), "epoch": state.get("epoch"), "ste": cfg.ste.name,
            "abits": cfg.abits, **out}


def stats_of_start(overrides: list[str], limit_test: int | None, batch_stats: bool) -> dict:
    from qtrain.tools.eval import load_start

    cfg, built, run_dir = load_start(overrides, limit_test)
    _, context = built.method.evaluations()[0]
    out = count_regions(built.model, built.data.test, torch.device("cpu"), context, batch_stats)
    return {"what": "start", "float_model": str(run_dir), "overrides": overrides, "ste": cfg.ste.name,
            "abits": cfg.abits, **out}


def print_table(result: dict) -> None:
    print(f"{result['what']}: {result.get('checkpoint') or result.get('float_model')}")
    print(f"{'layer':22s} {'bits':>4s} {'alpha':>7s} {'top':>6s} {'mean':>7s} {'std':>6s} "
          f"{'below0':>7s} {'inside':>7s} {'above':>7s} {'off':>4s} {'sat':>4s} {'of':>4s}")
    for name, s in result["layers"].items():
        print(f"{name:22s} {s['bits']:4d} {s['alpha']:7.4f} {s['top']:6.3f} {s['mean']:7.3f} {s['std']:6.3f} "
              f"{s['below']:7.2%} {s['inside']:7.2%} {s['above']:7.2%} {s.get('channels_off', 0):4d} "
              f"{s.get('channels_saturated', 0):4d} {s.get('channels', 0):4d}")
    for pos, g in result["groups"].items():
        print(f"{pos + ' (' + str(g['layers']) + ' layers)':22s} {'':36s} "
              f"{g['below']:7.2%} {g['inside']:7.2%} {g['above']:7.2%} {g['channels_off']:4d} "
              f"{g['channels_saturated']:4d} {g['channels']:4d}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "start"), help="a trained cell's run folder, or a cell's quantized start")
    p.add_argument("args", nargs="+", help="run: run folders or checkpoints; start: the cell's overrides")
    p.add_argument("--limit-test", type=int, default=None, help="the first N test images (default: all)")
    p.add_argument("--batch-stats", action="store_true", help="normalise by each batch's statistics (training forward)")
    p.add_argument("--json", type=Path, help="also append the result here, one JSON object per line")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    a = p.parse_args(argv)
    try:
        if a.what == "run":  # one result per run folder, in the order given
            results = [stats_of_run(Path(path), a.limit_test, a.batch_stats) for path in a.args]
        else:
            results = [stats_of_start(a.args, a.limit_test, a.batch_stats)]
    except QtrainError as e:
        print(f"activation_stats: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    for result in results:
        result.update(limit_test=a.limit_test, batch_stats=a.batch_stats, torch=torch.__version__)
        if not a.quiet:
            print_table(result)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(result) + "\n")

if __name__ == "__main__":
    main()
