"""The norms of a model's weights, per layer and per stage, read from run checkpoints (no data, no forward pass).

    python scripts/weight_norms.py <run folder or checkpoint> [...] [--json out.jsonl]

Why: a convolution followed by a batch norm computes the same function at any scale of its weights, so its
weights' norm only sets how far one SGD step turns them (about lr |g| / |w|, with |g| itself proportional to
1 / |w|). A step that is large against |w| grows the norm (the gradient of such a layer is orthogonal to its
weights), and a layer whose norm has grown many times over is, in effect, trained at a learning rate divided by
the square of that factor. Comparing the norms of a cell's end with those of its float start shows where that
happened. The stages are the groups of convolutions with the same number of output channels, after the first
convolution (the stem): ResNet-20's 16 / 32 / 64-channel stages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from qtrain.errors import QtrainError


def weight_norms(state: dict) -> dict:
    """{"layers": {name: norm}, "groups": {"stem" | "<c> channels" | "fc" | "all": norm}} of a model state dict:
    the convolution and linear weights (the tensors named *.weight with 2 or 4 dimensions)."""
    weights = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)}
    if not weights:
        raise QtrainError("no convolution or linear weight in this state dict.")
    layers = {k: float(v.double().norm()) for k, v in weights.items()}
    groups: dict[str, float] = {}
    first_conv = next((k for k, v in weights.items() if v.dim() == 4), None)
    for k, v in weights.items():
        group = "stem" if k == first_conv else f"{v.shape[0]} channels" if v.dim() == 4 else "fc"
        groups[group] = groups.get(group, 0.0) + layers[k] ** 2
    groups["all"] = sum(n**2 for n in layers.values())
    return {"layers": layers, "groups": {g: s**0.5 for g, s in groups.items()}}


def norms_of(path: Path) -> dict:
    from qtrain.store import checkpoint

    ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not ckpt.exists():
        raise QtrainError(f"{ckpt}: no such checkpoint. Give a run folder or a qtrain checkpoint file.")
    state = checkpoint.load(ckpt)  # verified
    if "model" not in state:
        raise QtrainError(f"{ckpt} holds no model state: it is not a qtrain run checkpoint.")
    return {"checkpoint": str(ckpt), "epoch": state.get("epoch"), **weight_norms(state["model"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="run folders (their checkpoints/last.pt) or checkpoint files")
    p.add_argument("--json", type=Path, help="also append the results here, one JSON object per line")
    a = p.parse_args(argv)
    for path in a.paths:
        try:
            r = norms_of(path)
        except QtrainError as e:
            print(f"weight_norms: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        print(f"{r['checkpoint']} (epoch {r['epoch']}): "
              + ", ".join(f"{g} {n:.1f}" for g, n in r["groups"].items()))
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
