"""`qtrain-export`: the trained quantized model out of qtrain, as safetensors and ONNX.

    qtrain-export outputs/runs/<...>/s0_<time>            -> <run>/export/model.safetensors, model.onnx
    qtrain-export run_dir --out exported/ --verify       also runs the ONNX model with onnxruntime on the
                                                          test set and compares with qtrain's own evaluation

model.safetensors
    per quantized layer ``<layer>.weight.codes`` (int8) and ``<layer>.weight.scale`` (float32, one value):
    codes x scale = Q(w) exactly (qtrain defines Q(w) that way); every other tensor of the state dict
    (batch-norm statistics, biases, the float layers) as float32; per quantized activation
    ``<act>.alpha``; the bits of each quantized activation and the config in the metadata.

model.onnx (opset 17)
    each quantized weight is an int8 initializer (the codes) with its scale, turned into the float
    weight by a standard DequantizeLinear node; each quantized activation is the ceil staircase
    alpha * Clip(Ceil(x / alpha), 0, 2^b - 1), written with Div/Ceil/Clip/Mul. (ONNX's QuantizeLinear
    rounds half to even, which cannot express ceil exactly at the ties x = k alpha; these four ops
    compute the same float32 operations as qtrain's training code.) Running it needs onnxruntime only,
    none of qtrain's code.

--verify runs the ONNX model with onnxruntime on the run's test set and compares its predictions
with qtrain's evaluation of the checkpoint, at ORT_ENABLE_BASIC (identical on every sample in our
tests) and ORT_ENABLE_ALL (whose fused, re-laid-out convolutions round differently in the last
bit: an activation then sometimes lands on the neighbouring step; 11 of 10,000 MNIST predictions
differed in docs/EXPORT.md's example).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import QtrainError
from qtrain.quant.act import QuantReLU
from qtrain.quant.weight import make_code_quantizer
from qtrain.tools.eval import load_run


class _Dequantize(torch.autograd.Function):
    """int8 codes -> float weight; exported as ONNX DequantizeLinear(codes, scale, zero_point=0)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        return codes.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point)


class QuantizedWeight(nn.Module):
    """A conv or linear layer whose weight is int8 codes times a scale."""

    def __init__(self, layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.reshape(()).float())
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int8))
        del layer.weight  # the weight now comes from the codes

    def forward(self, x):
        w = _Dequantize.apply(self.codes, self.scale, self.zero_point)
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        if isinstance(layer, nn.Conv1d):
            return F.conv1d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, w, layer.bias)


class Staircase(nn.Module):
    """sigma_alpha(x) = alpha * clamp(ceil(x / alpha), 0, 2^b - 1): qtrain's forward, in plain ops."""

    def __init__(self, bits: int, alpha: float):
        super().__init__()
        self.bits, self.top = bits, float(2**bits - 1)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x):
        return torch.clamp(torch.ceil(x / self.alpha), 0.0, self.top) * self.alpha


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def export_model(model: nn.Module, cfg, names: list[str]):
    """(export module, safetensors dict, metadata): codes and scales of every quantized weight."""
    import copy

    codes_fn = make_code_quantizer(cfg.wbits, cfg.wquant)
    model = copy.deepcopy(model).eval()
    tensors, meta = {}, {"format": "qtrain-export/1", "wbits": str(cfg.wbits), "abits": str(cfg.abits)}
    for name in names:
        layer_name = name.removesuffix(".weight")
        layer = model.get_submodule(layer_name)
        with torch.no_grad():
            codes, scale = codes_fn(layer.weight.detach().float())
        if codes.abs().max() > 127:
            raise QtrainError(f"{name}: codes up to {int(codes.abs().max())} do not fit int8.")
        tensors[f"{name}.codes"] = codes.to(torch.int8).contiguous()
        tensors[f"{name}.scale"] = scale.reshape(1).float().contiguous()
        _set_module(model, layer_name, QuantizedWeight(layer, codes, scale))
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantReLU):
            alpha = float(m.alpha.detach())
            tensors[f"{name}.alpha"] = torch.tensor([alpha])
            meta[f"{name}.bits"] = str(m.bits)
            _set_module(model, name, Staircase(m.bits, alpha))
    # everything else of the state dict, as float32 (the quantized weights are replaced by their codes)
    for key, value in model.state_dict().items():
        if key.endswith((".codes", ".scale", ".zero_point", ".alpha")) or not value.is_floating_point():
            continue
        tensors[key.replace(".layer.", ".")] = value.detach().float().contiguous()
    return model, tensors, meta


def write_onnx(model: nn.Module, input_shape, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def onnx_predictions(path: Path, loader, level: str = "ORT_ENABLE_BASIC") -> torch.Tensor:
    """Predictions of the ONNX model under onnxruntime (CPU) at graph optimisation ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    preds = [torch.from_numpy(session.run(["logits"], {"input": x.float().contiguous().numpy()})[0]).argmax(1)
             for x, _ in loader]
    return torch.cat(preds)


@torch.no_grad()
def qtrain_predictions(model: nn.Module, loader) -> torch.Tensor:
    return torch.cat([model(x).argmax(1) for x, _ in loader])


def export(path: Path, out: Path | None = None, data_root: str | None = None, verify: bool = False) -> dict:
    try:  # the export extra: safetensors, onnx, onnxruntime (imported only by qtrain-export)
        import onnx  # noqa: F401
        from safetensors.torch import save_file
    except ImportError as e:
        raise QtrainError(f"qtrain-export needs {e.name}: pip install -e '.[export]' (safetensors, onnx, "
                          "onnxruntime).") from None

    ckpt, state, cfg, data, model, names, method, _ = load_run(path, data_root, channels_last=False)  # ONNX: NCHW
    out = Path(out) if out else ckpt.parent.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    exported, tensors, meta = export_model(model, cfg, names)
    meta["config"] = json.dumps(state["config"], default=str)
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    write_onnx(exported, data.input_shape, out / "model.onnx")
    report = {"checkpoint": str(ckpt), "safetensors": str(out / "model.safetensors"), "onnx": str(out / "model.onnx"),
              "quantized_layers": len(names)}
    if verify:
        labels = torch.cat([y for _, y in data.test])
        with method.evaluations()[0][1]:  # qtrain's own evaluation: Q(w) installed, as the run's test/acc
            ours = qtrain_predictions(model, data.test)
        report.update({"test_samples": len(labels), "qtrain_test_acc": 100 * int((ours == labels).sum()) / len(labels)})
        # ORT_ENABLE_ALL adds layout transforms and fusions that sum the convolutions in another order;
        # a last-bit difference can move an activation across a staircase step, so both are reported
        for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
            theirs = onnx_predictions(out / "model.onnx", data.test, level)
            report[f"onnx_{level.lower()}"] = {"same_predictions": int((ours == theirs).sum()) / len(labels),
                                               "test_acc": 100 * int((theirs == labels).sum()) / len(labels)}
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="qtrain-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder or a checkpoint file")
    p.add_argument("--out", type=Path, help="folder for model.safetensors and model.onnx (default: <run>/export)")
    p.add_argument("--data-root", help="where the data is on this machine (default: as when it was trained)")
    p.add_argument("--verify", action="store_true",
                   help="run the ONNX model on the test set with onnxruntime and compare with qtrain's predictions")
    args = p.parse_args(argv)
    try:
        report = export(args.path, args.out, args.data_root, args.verify)
    except QtrainError as e:
        print(f"qtrain-export: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
