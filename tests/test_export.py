"""qtrain-export: codes x scale = Q(w) exactly, the ONNX staircase equals qtrain's at the ties, and
onnxruntime's predictions equal qtrain's evaluation of the checkpoint."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from qtrain.quant.ste import staircase
from qtrain.quant.weight import make_weight_quantizer
from qtrain.run.runner import train_run
from qtrain.tools import export


@pytest.fixture
def trained_run(tmp_path, mnist_root):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "method=bcgd", "wbits=2", "abits=4", "act.learn_alpha=true", "epochs=1", "data.limit_train=2048",
            "data.limit_test=1000", f"data.root={mnist_root}"])
    with open_dict(cfg):
        cfg.progress, cfg.device = False, "cpu"
    run = tmp_path / "run"
    train_run(cfg, run)
    return run


def test_export_codes_times_scale_is_q_of_w_and_onnx_agrees(trained_run, tmp_path):
    report = export.export(trained_run, tmp_path / "out", verify=True)
    assert report["onnx_ort_enable_basic"]["same_predictions"] >= 0.999
    assert report["onnx_ort_enable_basic"]["test_acc"] == pytest.approx(report["qtrain_test_acc"], abs=0.2)
    result = json.loads((trained_run / "result.json").read_text())
    assert report["qtrain_test_acc"] == pytest.approx(result["final_test_acc"], abs=1e-9)

    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=False)
    q = make_weight_quantizer(2, "exact")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = [k.removesuffix(".codes") for k in f.keys() if k.endswith(".codes")]
        assert names
        for name in names:
            codes, scale = f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale")
            assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
            assert torch.equal(codes.float() * scale, q(state["model"][name]))  # exactly
        assert f.metadata()["features.2.bits"] == "4"
        assert abs(f.get_tensor("features.2.alpha").item() - state["model"]["features.2.alpha"].item()) < 1e-7
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {"DequantizeLinear", "Ceil", "Clip"} <= ops


def test_onnx_staircase_equals_qtrain_at_the_ties(tmp_path):
    alpha, bits = torch.tensor(0.1946), 4
    k = torch.arange(-2, 18, dtype=torch.float32)
    exact = k * alpha  # x = k alpha: ceil must give k, not k + 1 (QuantizeLinear's rounding would not)
    x = torch.cat([exact, torch.nextafter(exact, exact + 1), torch.nextafter(exact, exact - 1),
                   torch.randn(5000) * 2])
    module = export.Staircase(bits, float(alpha))
    path = tmp_path / "s.onnx"
    export.write_onnx(module, (x.numel(),), path)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x[None].numpy()})[0]
    want = staircase(x, alpha, bits).numpy()
    assert np.array_equal(got[0], want)


def test_export_of_a_missing_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no such checkpoint" in capsys.readouterr().err


def test_residual_without_the_qdq_format_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "nothing"), "--residual", "float"])
    assert e.value.code == 2 and "--residual applies to --format qdq only" in capsys.readouterr().err


def _small_run(tmp_path, data_overrides, name):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=bcgd", "wbits=1", "abits=2", "epochs=1",
                                                       *data_overrides])
    with open_dict(cfg):
        cfg.progress, cfg.device = False, "cpu"
    run = tmp_path / name
    train_run(cfg, run)
    return run


@pytest.mark.parametrize("data", ["mnist", "cifar10", "npz", "idx"])
def test_the_default_export_takes_stored_images_and_matches_qtrain_on_every_sample(tmp_path, mnist_root,
                                                                                 fake_cifar_root, data):
    """uint8 [N, C, H, W] in, the normalisation inside the graph: onnxruntime's predictions are qtrain's on
    every test sample, and the metadata says how to feed the model."""
    import onnx

    given = {"mnist": [f"data.root={mnist_root}", "data.limit_train=512", "data.limit_test=300"],
             "cifar10": ["data=cifar10", "model=resnet20", f"data.root={fake_cifar_root}", "data.batch_size=16"],
             "npz": ["data=npz", "model=resnet20", f"data.root={fake_cifar_root}", "data.file=cifar10.npz",
                     "data.num_classes=10", "data.batch_size=16"],
             "idx": ["data=idx", f"data.root={mnist_root}", "data.folder=MNIST/raw", "data.limit_train=512",
                     "data.limit_test=300"]}[data]
    report = export.export(_small_run(tmp_path, given, data), tmp_path / "out", verify=True)
    assert report["input"] == "uint8" and report["onnx_ort_enable_basic"]["same_predictions"] == 1.0
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    props = {p.key: p.value for p in proto.metadata_props}
    pre = json.loads(props["qtrain.preprocessing"])
    assert pre["rule"] == "shift_scale" and len(pre["mean"]) == len(pre["std"]) == (3 if data in ("cifar10", "npz") else 1)
    assert props["qtrain.num_classes"] == "10" and json.loads(props["qtrain.activations"])
    assert report["metadata"]["qtrain.preprocessing"] == pre  # export.json says the same
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["qtrain.preprocessing"]) == pre


def test_the_qdq_export_differs_from_the_staircase_only_at_the_ties(tmp_path):
    alpha, bits = 0.1946, 4
    k = torch.arange(-2, 18, dtype=torch.float32)
    ties = k * alpha
    random = torch.randn(20000) * 2
    random = random[((random / alpha) - (random / alpha).round()).abs() > 1e-4]  # away from the ties
    others = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1), random])
    path = tmp_path / "q.onnx"
    x = torch.cat([ties, others])
    export.write_onnx(export.QDQStaircase(bits, alpha), (x.numel(),), path)
    import onnx

    assert {"QuantizeLinear", "DequantizeLinear", "Clip"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    got = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                           .run(None, {"input": x[None].numpy()})[0][0])
    want = staircase(x, torch.tensor(alpha), bits)
    near = 3 * len(ties)  # the ties and their float neighbours: x / alpha + 1/2 may round to the tie there
    assert torch.equal(got[near:], want[near:])  # every other input: the same level
    assert (got[:near] != want[:near]).any() and ((got[:near] - want[:near]).abs() <= alpha * 1.0001).all()


def test_qdq_and_float_input_exports_verify(trained_run, tmp_path):
    report = export.export(trained_run, tmp_path / "q", verify=True, fmt="qdq")
    assert report["format"] == "qdq" and report["onnx_ort_enable_basic"]["same_predictions"] >= 0.99
    floats = export.export(trained_run, tmp_path / "f", verify=True, kind="float")
    assert floats["onnx_ort_enable_basic"]["same_predictions"] == 1.0
    assert floats["graph_in_pytorch"]["same_predictions"] == 1.0  # the fold itself changes nothing here
    import onnx

    assert onnx.load(str(tmp_path / "f" / "model.onnx")).graph.input[0].type.tensor_type.elem_type == \
        onnx.TensorProto.FLOAT


def test_batch_norm_folds_into_the_quantized_convolution_with_positive_per_channel_scales():
    """codes x (s gamma / sigma) and the bias beta - mu gamma / sigma: the conv + BN output to float rounding,
    with a negative gamma (codes flipped) and a zero gamma (a dead channel) among the channels."""
    from qtrain.tools.qdq_fold import FoldedWeight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    codes = torch.randint(-1, 2, conv.weight.shape).to(torch.int8)
    quantized = export.QuantizedWeight(conv, codes, torch.tensor(0.05))
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.3]))
        bn.bias.normal_()
    x = torch.randn(8, 4, 10, 10)
    with torch.no_grad():
        want = bn(quantized(x))
        folded = FoldedWeight(quantized, bn)
        got = folded(x)
    assert folded.codes.dtype == torch.int8 and (folded.scale > 0).all() and folded.scale.shape == (6,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


class _ResidualBlock(torch.nn.Module):
    """staircase -> quantized conv -> + the staircase's output -> staircase: one ResNet block, two alphas."""

    def __init__(self, alpha_in: float, alpha_out: float, bits_out: int = 4):
        super().__init__()
        conv = torch.nn.Conv2d(3, 3, 3, padding=1)  # (a bias: sums of levels x codes exactly on a step are ties)
        self.act_in = export.QDQStaircase(4, alpha_in)
        self.conv = export.QuantizedWeight(conv, torch.randint(-1, 2, conv.weight.shape).to(torch.int8),
                                           torch.tensor(0.37))
        self.act_out = export.QDQStaircase(bits_out, alpha_out)

    def forward(self, x):
        s = self.act_in(x)
        return self.act_out(self.conv(s) + s)


@pytest.mark.parametrize("alpha_in, alpha_out, bits_out, integer", [
    (0.5, 0.5, 4, True),     # the same grid: the convolution's output quantized at alpha
    (0.45, 0.5, 4, True),    # on alpha / 8, which reaches the shortcut's top 15 x 0.45
    (0.8, 0.5, 4, True),     # on 15 x 0.8 / 128, coarser than alpha / 8 so that it reaches 15 x 0.8
    (2.0, 0.1, 4, False),    # the shortcut's levels reach 30, alpha / 8 codes only -1.6: no integer add
    (0.05, 0.05, 8, False),  # 255 levels do not fit 127 int8 steps of alpha
])
def test_an_integer_residual_add_only_where_its_int8_codes_cannot_saturate(alpha_in, alpha_out, bits_out, integer):
    from qtrain.tools.qdq_fold import Grid, Levels, fold_for_integer_kernels

    torch.manual_seed(0)
    block = _ResidualBlock(alpha_in, alpha_out, bits_out).eval()
    folded = fold_for_integer_kernels(block, export.QuantizedWeight, export.QDQStaircase)
    x = torch.randn(16, 3, 8, 8) * 4 * alpha_in * 2**4  # over the staircase: its output reaches far below zero
    with torch.no_grad():
        want, got = block(x), folded(x)
    kinds = [type(m) for m in folded.modules()]
    assert (Grid in kinds) == integer and (Levels in kinds) == integer
    steps = ((got - want) / alpha_out).abs()
    if integer and alpha_in != alpha_out:  # the sum rounded once more: one step, rarely
        assert steps.max() <= 1 and (steps > 0.5).float().mean() < 0.05
    else:  # the same up to the ties
        assert (steps > 0.5).float().mean() < 1e-3


@pytest.fixture
def cifar_resnet_run(tmp_path, fake_cifar_root):
    """A ResNet-20, binary weights, 4-bit activations with learned alpha (a different alpha in each block, so
    the residual adds meet two grids), one epoch on the 64 stand-in images."""
    return _small_run(tmp_path, ["data=cifar10", "model=resnet20", f"data.root={fake_cifar_root}",
                                 "data.batch_size=16", "abits=4", "act.learn_alpha=true"], "resnet")


def test_the_qdq_export_runs_on_integer_convolutions_and_residual_float_is_exact(cifar_resnet_run, tmp_path):
    """After onnxruntime's ORT_ENABLE_ALL, every quantized convolution of the QDQ graph is a QLinearConv and
    every residual add a QLinearAdd; with --residual float the nine second convolutions of the blocks stay
    float, and the predictions are qtrain's."""
    integer = export.export(cifar_resnet_run, tmp_path / "i", verify=True, fmt="qdq", bench=True)
    ops = integer["ops_after_ort_enable_all"]
    speeds = integer["images_per_s_ort_enable_all"]
    assert list(speeds) == ["float network (latent weights, ReLU)", "qdq graph"]
    assert speeds["qdq graph"]["rounds"] == 7 and speeds["qdq graph"]["ratio_to_first"] > 0
    assert ops["QLinearConv"] == 18 and ops["QLinearAdd"] == 9  # 19 convs: the stem takes the float image
    assert "BatchNormalization" not in ops and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1
    assert ops["Min"] == 19 and "Clip" not in ops  # the staircase's top on the uint8 codes, not in float
    assert integer["residual"] == "integer" and integer["onnx_ort_enable_basic"]["same_predictions"] >= 0.9
    floats = export.export(cifar_resnet_run, tmp_path / "f", verify=True, fmt="qdq", residual="float", bench=True)
    ops = floats["ops_after_ort_enable_all"]
    assert ops["QLinearConv"] == 9 and "QLinearAdd" not in ops
    assert floats["onnx_ort_enable_basic"]["same_predictions"] == 1.0
    assert floats["graph_in_pytorch"]["same_predictions"] == 1.0  # the fold itself changes nothing here
    exact = export.export(cifar_resnet_run, tmp_path / "e", bench=True)  # the exact graph: float convolutions
    assert "QLinearConv" not in exact["ops_after_ort_enable_all"]
