"""Model summary in the manner of Larq's: every layer with its bits, parameters, multiply-adds
(split by precision) and memory, float vs quantized, and totals. Printed at the start of a run
and stored in result.json (``model_summary``).

Bits of a layer's *input*: a conv/linear layer reads ``abits``-bit inputs when the last thing before
it (in the model's definition order, which is its forward order for qtrain's models) was a quantized
activation, possibly max-pooled (max-pooling keeps values on the staircase's grid); the image, and
anything average-pooled, counts as 32-bit.
Memory: quantized weights cost ``wbits`` bits each plus one float32 scale per layer; everything
else (float layers, biases, batch-norm statistics, alphas) 32-bit.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.quant.act import QuantReLU

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds for one sample."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    per_output = module.in_channels // module.groups
    for k in module.kernel_size:
        per_output *= k
    return per_output * out[0].numel()


@torch.no_grad()
def _trace(model: nn.Module, input_shape) -> dict:
    """Output shape of every leaf module for one sample (a dry forward in eval mode)."""
    shapes, hooks = {}, []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, o)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def model_summary(model: nn.Module, quantized: list[str], wbits: int | None, abits: int | None,
                  input_shape=None) -> dict:
    qset = set(quantized)
    outputs = _trace(model, input_shape) if input_shape is not None else {}
    rows = []
    on_grid = False  # does the next layer read staircase outputs? (walked in definition order = forward order)
    macs_by_precision: dict[str, int] = {}
    for name, m in model.named_modules():
        if list(m.children()):
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        buffers = sum(b.numel() for n, b in m.named_buffers(recurse=False)  # saved ones: BN statistics, alpha
                      if b.is_floating_point() and n not in m._non_persistent_buffers_set)
        if not params and not isinstance(m, (QuantReLU, nn.MaxPool2d, nn.AvgPool2d)) and name not in outputs:
            continue
        w_bits = in_bits = None
        macs = 0
        weight_quantized = f"{name}.weight" in qset
        if isinstance(m, QuantReLU):
            on_grid = True
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            on_grid = False  # averages of levels are not levels (max-pooling keeps them)
        if isinstance(m, WEIGHTED):
            w_bits = wbits if weight_quantized else 32
            in_bits = abits if on_grid and abits is not None else 32
            on_grid = False
            if name in outputs:
                macs = _macs(m, outputs[name])
                key = f"w{w_bits}a{in_bits}"
                macs_by_precision[key] = macs_by_precision.get(key, 0) + macs
        weight = getattr(m, "weight", None)
        n_weight = weight.numel() if isinstance(weight, torch.Tensor) else 0
        float_bytes = 4 * (params + buffers)
        quant_bytes = float_bytes
        if weight_quantized and wbits:
            quant_bytes = 4 * (params + buffers - n_weight) + (n_weight * wbits + 7) // 8 + 4
        out = outputs.get(name)
        rows.append({"name": name or "(model)", "type": type(m).__name__,
                     "output": list(out.shape[1:]) if isinstance(out, torch.Tensor) else None,
                     "wbits": w_bits, "in_bits": in_bits,
                     "abits": m.bits if isinstance(m, QuantReLU) else None,
                     "params": params, "macs": macs, "float_bytes": float_bytes, "quantized_bytes": quant_bytes})
    total = sum(p.numel() for p in model.parameters())
    n_quant = sum(dict(model.named_parameters())[n].numel() for n in quantized)
    float_bytes = sum(r["float_bytes"] for r in rows)
    quant_bytes = sum(r["quantized_bytes"] for r in rows)
    return {
        "layers": [{"name": n, "params": dict(model.named_parameters())[n].numel(), "wbits": wbits, "abits": abits}
                   for n in quantized],
        "all_layers": rows,
        "total_params": total,
        "quantized_params": n_quant,
        "quantized_activations": sum(isinstance(m, QuantReLU) for m in model.modules()),
        "macs": sum(macs_by_precision.values()),
        "macs_by_precision": macs_by_precision,
        "float_bytes": float_bytes,
        "quantized_bytes": quant_bytes,
        "compression": float_bytes / quant_bytes if quant_bytes else 1.0,
    }


@torch.no_grad()
def distinct_values(model: nn.Module, names: list[str]) -> dict:
    """Number of distinct values in each named weight, as the model holds them now."""
    params = dict(model.named_parameters())
    return {n: int(torch.unique(params[n]).numel()) for n in names}


def _bits(b) -> str:
    return "-" if b is None else str(b)


def format_summary(s: dict) -> str:
    head = f"{'layer':<28} {'type':<24} {'output':<14} {'w':>3} {'in':>3} {'act':>3} {'params':>9} {'MACs':>11} " \
           f"{'float KiB':>9} {'quant KiB':>9}"
    lines = [head, "-" * len(head)]
    for r in s.get("all_layers", []):
        out = "x".join(map(str, r["output"])) if r["output"] else ""
        lines.append(f"{r['name'][:28]:<28} {r['type'][:24]:<24} {out[:14]:<14} {_bits(r['wbits']):>3} "
                     f"{_bits(r['in_bits']):>3} {_bits(r['abits']):>3} {r['params']:>9,} {r['macs']:>11,} "
                     f"{r['float_bytes'] / 1024:>9.1f} {r['quantized_bytes'] / 1024:>9.1f}")
    lines.append("-" * len(head))
    by = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.get("macs_by_precision", {}).items()))
    lines.append(f"total params {s['total_params']:,} (quantized {s['quantized_params']:,}); "
                 f"{s['quantized_activations']} quantized activations; MACs per sample {s.get('macs', 0):,} ({by})")
    lines.append(f"memory: float {s['float_bytes'] / 1024:.1f} KiB -> quantized {s['quantized_bytes'] / 1024:.1f} KiB "
                 f"(compression {s['compression']:.2f}x)")
    return "\n".join(lines)
