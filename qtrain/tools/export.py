"""`qtrain-export`: the trained quantized model out of qtrain, as safetensors and ONNX.

    qtrain-export outputs/runs/<...>/s0_<time>            -> <run>/export/model.safetensors, model.onnx
    qtrain-export run_dir --out exported/ --verify       also runs the ONNX model with onnxruntime on the
                                                          test set and compares with qtrain's own evaluation
    qtrain-export run_dir --format qdq --verify --bench  the integer-kernel (QDQ) graph, its accuracy, and
                                                          images/s beside the float network's
    qtrain-export run_dir --format qdq --residual float  the same with ResNet's residual adds in float

The model takes the images as the dataset stores them (uint8 [N, C, H, W]) and normalises them inside the
graph, exactly as qtrain's loader does; ``--input float`` takes the normalised float tensor instead. The
mean/std, the class count, the input layout, and each activation's bits and alpha are in the ONNX metadata
(``metadata_props``, keys ``qtrain.*``), in export.json and in the safetensors metadata.

model.safetensors
    per quantized layer ``<layer>.weight.codes`` (int8) and ``<layer>.weight.scale`` (float32, one value):
    codes x scale = Q(w) exactly (qtrain defines Q(w) that way); every other tensor of the state dict
    (batch-norm statistics, biases, the float layers) as float32; per quantized activation
    ``<act>.alpha``; the bits of each quantized activation and the config in the metadata.

model.onnx (opset 17), --format exact (the default)
    each quantized weight is an int8 initializer (the codes) with its scale, turned into the float
    weight by a standard DequantizeLinear node; each quantized activation is the ceil staircase
    alpha * Clip(Ceil(x / alpha), 0, 2^b - 1), written with Div/Ceil/Clip/Mul. (ONNX's QuantizeLinear
    rounds half to even, which cannot express ceil exactly at the ties x = k alpha; these four ops
    compute the same float32 operations as qtrain's training code.) Running it needs onnxruntime only,
    none of qtrain's code.

model.onnx, --format qdq
    the form runtimes (ONNX Runtime, TensorRT, OpenVINO) turn into integer kernels. The ceil staircase
    becomes a round by shifting half a step: round(x / alpha + 1/2) is ceil(x / alpha) except at the ties
    x = k alpha, where the round half to even of QuantizeLinear may give k + 1. Before export each batch
    norm and each half-step is folded into its convolution (int8 codes, one positive scale per output
    channel, a float bias; qtrain/tools/qdq_fold.py), so each activation is QuantizeLinear(alpha, uint8),
    Min(codes, 2^b - 1), DequantizeLinear, and onnxruntime replaces DequantizeLinear -> Conv ->
    QuantizeLinear by integer convolutions (QLinearConv) and ResNet's residual adds by QLinearAdd. A
    pattern the fold does not know keeps the unfolded form (Clip(x, 0, (2^b - 1.5) alpha) + alpha/2, then
    QuantizeLinear/DequantizeLinear): the same values, in float kernels. ``--residual float`` keeps the
    residual adds in float: exact up to the ties, where the integer add rounds the sum once more
    (docs/EXPORT.md measures both).

--verify runs the ONNX model on the run's test set and compares its predictions with qtrain's
evaluation of the checkpoint: the exported graph in PyTorch (what the graph's own rounding changes),
and onnxruntime at ORT_ENABLE_BASIC and ORT_ENABLE_ALL (what the runtime adds: convolutions that sum
in another order, the integer kernels' int32 bias; an activation then sometimes lands on the
neighbouring step). docs/EXPORT.md gives the measured agreement of each format.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import QtrainError
from qtrain.keys import short_name
from qtrain.quant.act import QuantReLU
from qtrain.quant.weight import make_code_quantizer
from qtrain.tools.eval import load_run
from qtrain.tools.qdq_fold import RESIDUAL, Levels, fold_for_integer_kernels


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


class ShiftScale(nn.Module):
    """uint8 images -> the model's input exactly as qtrain's in-memory loader makes it (float32):
    (x - 255 mean) * (1 / (255 std)); exported as Cast, Sub, Mul."""

    def __init__(self, mean, std):
        super().__init__()
        shape = (1, -1, 1, 1)
        self.register_buffer("shift", (torch.tensor(mean) * 255).view(shape))
        self.register_buffer("scale", (1.0 / (torch.tensor(std) * 255)).view(shape))

    def forward(self, x):
        return (x.float() - self.shift) * self.scale


class DivideNormalize(nn.Module):
    """uint8 images -> the input as torchvision's ToTensor + Normalize make it (the ImageNet loader)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x.float() / 255 - self.mean) / self.std


PREPROCESS = {"shift_scale": ShiftScale, "divide_normalize": DivideNormalize}


class QDQStaircase(nn.Module):
    """The staircase in the form runtimes fuse into integer kernels: Clip, a half-step shift, then
    QuantizeLinear/DequantizeLinear (uint8, scale alpha): ceil(x / alpha) except at the ties x = k alpha."""

    def __init__(self, bits: int, alpha: float):
        super().__init__()
        self.top = 2**bits - 1
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x):
        a = float(self.alpha)
        x = torch.clamp(x, 0.0, (self.top - 0.5) * a) + 0.5 * a
        return torch.fake_quantize_per_tensor_affine(x, a, 0, 0, 255)


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


def export_model(model: nn.Module, cfg, names: list[str], fmt: str = "exact"):
    """(export module, safetensors dict, metadata): codes and scales of every quantized weight, each
    activation as the exact staircase (``fmt="exact"``) or its QDQ form (``"qdq"``)."""
    codes_fn = make_code_quantizer(cfg.wbits, cfg.wquant)
    model = copy.deepcopy(model).eval()
    tensors, meta = {}, {"format": "qtrain-export/1", "wbits": str(cfg.wbits), "abits": str(cfg.abits)}
    activation = QDQStaircase if fmt == "qdq" else Staircase
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
            _set_module(model, name, activation(m.bits, alpha))
    # everything else of the state dict, as float32 (the quantized weights are replaced by their codes)
    for key, value in model.state_dict().items():
        if key.endswith((".codes", ".scale", ".zero_point", ".alpha")) or not value.is_floating_point():
            continue
        tensors[key.replace(".layer.", ".")] = value.detach().float().contiguous()
    return model, tensors, meta


def write_onnx(model: nn.Module, input_shape, path: Path, dtype=torch.float32, metadata: dict | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape, dtype=dtype),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    if metadata:
        import onnx

        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))


def float_network(model: nn.Module) -> nn.Module:
    """The same network with its latent float weights and float ReLUs: the speed baseline of --bench."""
    net = copy.deepcopy(model).eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, QuantReLU):
            _set_module(net, name, nn.ReLU())
    return net


def session(path: Path, level: str = "ORT_ENABLE_BASIC", threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_predictions(path: Path, batches, level: str = "ORT_ENABLE_BASIC") -> torch.Tensor:
    """Predictions of the ONNX model under onnxruntime (CPU) at graph optimisation ``level``."""
    run = session(path, level)
    return torch.cat([torch.from_numpy(run.run(["logits"], {"input": x})[0]).argmax(1) for x in batches])


@torch.no_grad()
def qtrain_predictions(model: nn.Module, loader) -> torch.Tensor:
    return torch.cat([model(x).argmax(1) for x in loader])


def input_batches(data, kind: str) -> list:
    """The test set as the exported model takes it: uint8 images as the dataset stores them (the
    in-memory loader's tensors), or the normalised float batches qtrain trains on."""
    if kind == "float":
        return [x.float().contiguous().cpu().numpy() for x, _ in data.test]
    loader = data.test
    if not hasattr(loader, "x") or loader.x.dtype != torch.uint8:
        raise QtrainError("--verify with --input uint8 needs the test images in memory (MNIST, CIFAR, data=idx, "
                          "data=npz); for ImageNet verify with --input float.")
    return [loader.x[i:i + loader.batch_size].contiguous().cpu().numpy() for i in range(0, len(loader.x),
                                                                                       loader.batch_size)]


def optimized_ops(path: Path) -> dict:
    """How many nodes of each op the graph has after onnxruntime's ORT_ENABLE_ALL optimisation: whether its
    convolutions became integer kernels (QLinearConv) or stayed float (Conv, FusedConv)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # (it warns that the saved graph is specific to this machine)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items()))


def images_per_s(graphs: dict, rounds: int = 7, threads: int | None = None) -> dict:
    """Inference throughput under ORT_ENABLE_ALL of each ``name: (path, batches)`` over the test batches, the
    graphs timed in turn, one pass each per round, so that a slow stretch of a shared machine falls on all of
    them: per graph the median of ``rounds`` passes, and beside the first graph's the median of the per-round
    ratios to it."""
    runs = {name: (session(path, "ORT_ENABLE_ALL", threads), batches) for name, (path, batches) in graphs.items()}
    rates = {name: [] for name in graphs}
    for run, batches in runs.values():
        run.run(["logits"], {"input": batches[0]})  # warm-up
    for _ in range(rounds):
        for name, (run, batches) in runs.items():
            t = time.perf_counter()
            for x in batches:
                run.run(["logits"], {"input": x})
            rates[name].append(sum(len(x) for x in batches) / (time.perf_counter() - t))
    base = rates[next(iter(graphs))]
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": rounds,
                   "ratio_to_first": statistics.median(x / y for x, y in zip(r, base))} for name, r in rates.items()}


def metadata_of(cfg, data, exported: nn.Module, kind: str, fmt: str) -> dict:
    """What whoever receives the file needs to feed it: the input, its normalisation, the classes, and
    each quantized activation's bits and alpha."""
    pre = data.preprocessing if kind == "uint8" else None
    acts = {n: {"bits": m.bits if isinstance(m, Staircase) else m.top.bit_length(), "alpha": float(m.alpha)}
            for n, m in exported.named_modules() if isinstance(m, (Staircase, QDQStaircase, Levels))}
    return {"qtrain.format": fmt, "qtrain.input": json.dumps(
                {"dtype": kind, "layout": "NCHW", "shape": ["N", *data.input_shape]} if kind == "uint8" else
                {"dtype": "float32", "layout": "NCHW", "shape": ["N", *data.input_shape],
                 "normalised": "as qtrain's loader (see qtrain.preprocessing)"}),
            "qtrain.preprocessing": json.dumps(data.preprocessing), "qtrain.inside_graph": str(pre is not None),
            "qtrain.num_classes": str(data.num_classes), "qtrain.wbits": str(cfg.wbits),
            "qtrain.abits": str(cfg.abits), "qtrain.activations": json.dumps(acts)}


def export(path: Path, out: Path | None = None, data_root: str | None = None, verify: bool = False,
           kind: str = "uint8", fmt: str = "exact", bench: bool = False, residual: str = "integer") -> dict:
    try:  # the export extra: safetensors, onnx, onnxruntime (imported only by qtrain-export)
        import onnx  # noqa: F401
        from safetensors.torch import save_file
    except ImportError as e:
        raise QtrainError(f"qtrain-export needs {e.name}: pip install -e '.[export]' (safetensors, onnx, "
                          "onnxruntime).") from None
    ckpt, state, cfg, data, model, names, method, _ = load_run(path, data_root, channels_last=False)  # ONNX: NCHW
    if kind == "uint8" and data.preprocessing is None:
        raise QtrainError(f"{short_name(cfg.data)} gives float inputs, not images: export it with --input float.")
    out = Path(out) if out else ckpt.parent.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    exported, tensors, meta = export_model(model, cfg, names, fmt)
    if fmt == "qdq":  # batch norm and the half-step into the convolutions: what the runtime fuses (qdq_fold.py)
        exported = fold_for_integer_kernels(exported, QuantizedWeight, QDQStaircase, residual)
    graph = exported
    if kind == "uint8":  # the normalisation inside the graph: images in as the dataset stores them
        pre = data.preprocessing
        graph = nn.Sequential(PREPROCESS[pre["rule"]](pre["mean"], pre["std"]), exported).eval()
    props = metadata_of(cfg, data, exported, kind, fmt)
    meta.update(props, config=json.dumps(state["config"], default=str))
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    write_onnx(graph, data.input_shape, out / "model.onnx", torch.uint8 if kind == "uint8" else torch.float32,
               props)
    report = {"checkpoint": str(ckpt), "safetensors": str(out / "model.safetensors"), "onnx": str(out / "model.onnx"),
              "format": fmt, "input": kind, "quantized_layers": len(names),
              **({"residual": residual} if fmt == "qdq" else {}),
              "metadata": {k: (json.loads(v) if v.startswith(("{", "[")) else v) for k, v in props.items()}}
    if verify or bench:
        batches = input_batches(data, kind)
    if verify:
        report.update(_verify(out / "model.onnx", model, method, data, batches, graph))
    if bench:
        float_path = out / "float_network.onnx"
        write_onnx(float_network(model), data.input_shape, float_path)
        floats = input_batches(data, "float")
        report["images_per_s_ort_enable_all"] = images_per_s(
            {"float network (latent weights, ReLU)": (float_path, floats), f"{fmt} graph": (out / "model.onnx", batches)})
        report["ops_after_ort_enable_all"] = optimized_ops(out / "model.onnx")
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _verify(path: Path, model: nn.Module, method, data, batches, graph: nn.Module) -> dict:
    """onnxruntime's predictions on the test set beside qtrain's evaluation of the checkpoint, and those of
    the exported graph run in PyTorch: which differences the graph makes (the QDQ ties, the folded residual
    adds' rounding) and which the runtime adds (its summation order, its int32 bias)."""
    labels = torch.cat([y for _, y in data.test])
    with method.evaluations()[0][1]:  # qtrain's own evaluation: Q(w) installed, as the run's test/acc
        ours = qtrain_predictions(model, (x for x, _ in data.test))
    report = {"test_samples": len(labels), "qtrain_test_acc": 100 * int((ours == labels).sum()) / len(labels)}
    with torch.no_grad():
        in_torch = torch.cat([graph(torch.from_numpy(x)).argmax(1) for x in batches])
    report["graph_in_pytorch"] = {"same_predictions": int((ours == in_torch).sum()) / len(labels),
                                  "test_acc": 100 * int((in_torch == labels).sum()) / len(labels)}
    # ORT_ENABLE_ALL adds layout transforms and fusions that sum the convolutions in another order;
    # a last-bit difference can move an activation across a staircase step, so both are reported
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        theirs = onnx_predictions(path, batches, level)
        report[f"onnx_{level.lower()}"] = {"same_predictions": int((ours == theirs).sum()) / len(labels),
                                           "test_acc": 100 * int((theirs == labels).sum()) / len(labels)}
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="qtrain-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder or a checkpoint file")
    p.add_argument("--out", type=Path, help="folder for model.safetensors and model.onnx (default: <run>/export)")
    p.add_argument("--data-root", help="where the data is on this machine (default: as when it was trained)")
    p.add_argument("--verify", action="store_true",
                   help="run the ONNX model on the test set with onnxruntime and compare with qtrain's predictions")
    p.add_argument("--input", choices=["uint8", "float"], default="uint8",
                   help="uint8: images as the dataset stores them, normalised inside the graph (default); "
                        "float: the normalised float tensor")
    p.add_argument("--format", choices=["exact", "qdq"], default="exact",
                   help="exact: the ceil staircase op for op (default); qdq: QuantizeLinear/DequantizeLinear, the "
                        "form runtimes run on integer kernels")
    p.add_argument("--residual", choices=RESIDUAL, default=None,
                   help="with --format qdq, a residual add before a staircase: integer (default; the add and the "
                        "convolution before it run on integer kernels, the sum is rounded once more) or float "
                        "(exact up to the ties, that convolution in float)")
    p.add_argument("--bench", action="store_true",
                   help="images/s under onnxruntime (ORT_ENABLE_ALL, median of 7 passes over the test set) of "
                        "this graph and of the float network, timed in turn, and the median ratio of the two")
    args = p.parse_args(argv)
    if args.residual is not None and args.format != "qdq":
        p.error("--residual applies to --format qdq only (the exact graph has no integer adds)")
    try:
        report = export(args.path, args.out, args.data_root, args.verify, args.input, args.format, args.bench,
                        args.residual or "integer")
    except QtrainError as e:
        print(f"qtrain-export: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
