"""Model summary: quantized layers, their bits, and the float vs quantized size of the model."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.quant import QuantReLU


def model_summary(model: nn.Module, quantized: list[str], wbits: int | None, abits: int | None) -> dict:
    """Per-layer rows and totals. Quantized weights cost ``wbits`` bits each plus one float32
    scale per layer; every other parameter (and batch-norm buffer) stays 32-bit float."""
    params = dict(model.named_parameters())
    qset = set(quantized)
    rows = []
    for name, p in params.items():
        if name in qset:
            rows.append({"name": name, "params": p.numel(), "wbits": wbits, "abits": abits})
    total = sum(p.numel() for p in params.values())
    n_quant = sum(r["params"] for r in rows)
    float_bytes = 4 * total
    quant_bytes = 4 * (total - n_quant) + (n_quant * (wbits or 32) + 7) // 8 + (4 * len(rows) if wbits else 0)
    return {
        "layers": rows,
        "total_params": total,
        "quantized_params": n_quant,
        "quantized_activations": sum(isinstance(m, QuantReLU) for m in model.modules()),
        "float_bytes": float_bytes,
        "quantized_bytes": quant_bytes,
        "compression": float_bytes / quant_bytes,
    }


@torch.no_grad()
def distinct_values(model: nn.Module, names: list[str]) -> dict:
    """Number of distinct values in each named weight, as the model holds them now."""
    params = dict(model.named_parameters())
    return {n: int(torch.unique(params[n]).numel()) for n in names}


def format_summary(s: dict) -> str:
    lines = [f"{'layer':<40} {'params':>10} {'wbits':>6} {'abits':>6}"]
    for r in s["layers"]:
        lines.append(f"{r['name']:<40} {r['params']:>10,} {str(r['wbits']):>6} {str(r['abits']):>6}")
    if not s["layers"]:
        lines.append("(no quantized weights)")
    lines.append(f"total params {s['total_params']:,}, quantized {s['quantized_params']:,}; "
                 f"{s['quantized_activations']} quantized activations")
    lines.append(f"size: float {s['float_bytes'] / 1024:.1f} KiB -> quantized {s['quantized_bytes'] / 1024:.1f} KiB "
                 f"(compression {s['compression']:.2f}x)")
    return "\n".join(lines)
