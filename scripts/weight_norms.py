"""The norms of a model's weights, per layer and per stage, read from run checkpoints (no data, no forward pass).

    python scripts/weight_norms.py <run folder or checkpoint> [...] [--from <run folder or checkpoint>] [--json out.jsonl]

Why: a convolution followed by a batch norm computes the same function at any scale of its weights, so its
weights' norm only sets how far one SGD step turns them (about lr |g| / |w|, with |g| itself proportional to
1 / |w|). A step that is large against |w| grows the norm (the gradient of such a layer is orthogonal to its
weights), and a layer whose norm has grown many times over is, in effect, trained at a learning rate divided by
the square of that factor. Comparing the norms of a cell's end with those of its float start shows where that
happened. The stages are the groups of convolutions with the same number of output channels, after the first
convolution (the stem): ResNet-20's 16 / 32 / 64-channel stages.

``--from``: also how far each group moved from that checkpoint (the run's start: a float model, or the cell a
[STE] §4.2 run started from): the distance |w - w0| / |w0| and the angle between w and w0. For a batch-normalised
layer the angle is what counts (its scale does not change the function), and it shows a layer that turned without
growing, which the norms alone cannot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


from qtrain.errors import QtrainError


def weight_norms(state: dict) -> dict:
    """{"layers": {name: norm}, "groups": {"stem" | "<c> channels" | "fc" | "all": norm}} of a model state dict:
    the convolution and linear weights (the tensors named *.weight with 2 or 4 dimensions)."""
    weights = _weights(state)
    if not weights:
        raise QtrainError("no convolution or linear weight in this state dict.")
    layers = {k: float(v.norm()) for k, v in weights.items()}
    groups: dict[str, float] = {}
    for k, group in _group_of(weights).items():
        groups[group] = groups.get(group, 0.0) + layers[k] ** 2
    groups["all"] = sum(n**2 for n in layers.values())
    return {"layers": layers, "groups": {g: s**0.5 for g, s in groups.items()}}


def _weights(state: dict) -> dict:
    return {k: v.double() for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)}


def _group_of(weights: dict) -> dict[str, str]:
    """layer name -> 'stem' | '<c> channels' | 'fc' (the first convolution is the stem)."""
    first_conv = next((k for k, v in weights.items() if v.dim() == 4), None)
    return {k: "stem" if k == first_conv else f"{v.shape[0]} channels" if v.dim() == 4 else "fc"
            for k, v in weights.items()}


def weight_change(state: dict, start: dict) -> dict:
    """{group: {"distance": |w - w0| / |w0|, "angle_deg": the angle between w and w0}} over each group's weights
    (the groups of weight_norms, and "all"), ``start`` being the state dict w0 the run started from."""
    w, w0 = _weights(state), _weights(start)
    if set(w) != set(w0) or any(w[k].shape != w0[k].shape for k in w):
        raise QtrainError("the --from checkpoint has other layers or shapes than this one: it is not this run's "
                          "start (give the float model or the cell the run started from).")
    sums: dict[str, list[float]] = {}  # group -> [|w - w0|^2, |w0|^2, <w, w0>, |w|^2]
    every = [0.0, 0.0, 0.0, 0.0]
    for k, group in _group_of(w).items():
        layer = (float((w[k] - w0[k]).pow(2).sum()), float(w0[k].pow(2).sum()), float((w[k] * w0[k]).sum()),
                 float(w[k].pow(2).sum()))
        for acc in (sums.setdefault(group, [0.0, 0.0, 0.0, 0.0]), every):
            for i, x in enumerate(layer):
                acc[i] += x
    sums["all"] = every  # last, as in weight_norms
    out = {}
    for group, (d2, n0, dot, n1) in sums.items():
        cos = max(-1.0, min(1.0, dot / max((n0 * n1) ** 0.5, 1e-300)))
        out[group] = {"distance": (d2 / max(n0, 1e-300)) ** 0.5, "angle_deg": math.degrees(math.acos(cos))}
    return out


def load_state(path: Path) -> tuple[Path, dict]:
    """(checkpoint file, verified checkpoint) of a run folder (its checkpoints/last.pt) or a checkpoint file."""
    from qtrain.store import checkpoint

    ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not ckpt.exists():
        raise QtrainError(f"{ckpt}: no such checkpoint. Give a run folder or a qtrain checkpoint file.")
    state = checkpoint.load(ckpt)  # verified
    if "model" not in state:
        raise QtrainError(f"{ckpt} holds no model state: it is not a qtrain run checkpoint.")
    return ckpt, state


def norms_of(path: Path, start: tuple[Path, dict] | None = None) -> dict:
    """The norms of a checkpoint's weights and, with ``start`` (load_state's result), their change from it."""
    ckpt, state = load_state(path)
    out = {"checkpoint": str(ckpt), "epoch": state.get("epoch"), **weight_norms(state["model"])}
    if start is not None:
        out["from"] = str(start[0])
        out["change"] = weight_change(state["model"], start[1]["model"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="run folders (their checkpoints/last.pt) or checkpoint files")
    p.add_argument("--from", dest="start", type=Path,
                   help="also each group's distance and angle from this checkpoint (the run's start)")
    p.add_argument("--json", type=Path, help="also append the results here, one JSON object per line")
    a = p.parse_args(argv)
    try:
        start = load_state(a.start) if a.start is not None else None  # once, for every path
        for path in a.paths:
            report(norms_of(path, start), a.json)
    except QtrainError as e:
        print(f"weight_norms: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def report(r: dict, json_path: Path | None) -> None:
    """Print one checkpoint's result (as soon as it is measured) and append it to ``json_path``."""
    print(f"{r['checkpoint']} (epoch {r['epoch']}): " + ", ".join(f"{g} {n:.1f}" for g, n in r["groups"].items()))
    if "change" in r:
        print(f"  from {r['from']}: " + ", ".join(f"{g} {c['distance']:.3f} ({c['angle_deg']:.1f} deg)"
                                                 for g, c in r["change"].items()))
    if json_path:
        with json_path.open("a") as f:
            f.write(json.dumps(r) + "\n")

if __name__ == "__main__":
    main()
