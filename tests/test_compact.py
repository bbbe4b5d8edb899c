"""act.impl=compact keeps one byte per element for the backward instead of the float input, and gives
bitwise the reference's levels, masks and alpha gradient: on random inputs, on the ties x = k alpha and
their float neighbours, for every estimator and alpha gradient, in float32 and under bf16; and a short
training run ends with the same checkpoint, whose fingerprint does not depend on act.impl."""

import itertools

import pytest
import torch

from qtrain.quant.act import QuantReLU
from qtrain.run.resume import fingerprint
from qtrain.run.runner import train_run


def inputs(alpha: float, bits: int, dtype=torch.float32) -> torch.Tensor:
    a = torch.tensor(alpha)
    ties = torch.arange(-2, 2**bits + 2, dtype=torch.float32) * a
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                   torch.randn(4000) * 2 * alpha * 2**bits, torch.tensor([0.0, -0.0, 1e-40, -1e-40])])
    return x.to(dtype)


def run(impl, x, bits, ste, learn, alpha_grad, grad, rounding="ceil"):
    act = QuantReLU(bits, 0.1946, ste, rounding=rounding, learn_alpha=learn, alpha_grad=alpha_grad).implemented_by(impl)
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    y.backward(grad)
    return y.detach(), xr.grad, None if not learn else act.alpha.grad


@pytest.mark.parametrize("bits,ste,learn,alpha_grad,dtype", [
    (b, s, learn, g, d) for b, s, (learn, g), d in itertools.product(
        (1, 2, 4), ("identity", "relu", "clipped_relu"), ((False, "mean"), (True, "mean"), (True, "exact")),
        (torch.float32, torch.bfloat16))])
def test_compact_is_bitwise_the_reference(bits, ste, learn, alpha_grad, dtype):
    x = inputs(0.1946, bits, dtype)
    grad = torch.randn(x.shape).to(dtype)
    ref = run("reference", x, bits, ste, learn, alpha_grad, grad)
    got = run("compact", x, bits, ste, learn, alpha_grad, grad)
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
            continue
        assert r.dtype == g.dtype and torch.equal(r, g)
        assert torch.equal(torch.signbit(r), torch.signbit(g))  # 0 * a negative gradient stays -0


def saved_bytes(impl, ste, learn) -> int:
    act = QuantReLU(4, 0.1946, ste, learn_alpha=learn).implemented_by(impl)
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    x = torch.randn(128, 16, 32, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x).sum().backward()
    return sum(total)


@pytest.mark.parametrize("ste,learn", [("clipped_relu", False), ("relu", False), ("clipped_relu", True)])
def test_compact_keeps_a_quarter_of_the_bytes(ste, learn):
    ref, compact = saved_bytes("reference", ste, learn), saved_bytes("compact", ste, learn)
    n = 128 * 16 * 32 * 32
    assert ref >= 4 * n and compact <= n + 64  # the float input (4 bytes) against one byte per element
    assert saved_bytes("compact", "identity", False) <= 64  # identity without a learned alpha: nothing


def test_a_short_run_is_bitwise_the_same_and_keeps_its_fingerprint(make_cfg, mnist_root, tmp_path):
    common = ["epochs=1", "data.limit_train=96", "data.limit_test=32", "data.batch_size=32", "method=bcgd", "wbits=1",
              "abits=4", "act.learn_alpha=true", f"data.root={mnist_root}"]
    states = []
    for impl in ("reference", "compact"):
        cfg = make_cfg(*common, f"act.impl={impl}")
        train_run(cfg, tmp_path / impl)
        states.append(torch.load(tmp_path / impl / "checkpoints" / "last.pt", weights_only=False))
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])
    assert fingerprint(make_cfg(*common, "act.impl=compact")) == fingerprint(make_cfg(*common, "act.impl=reference"))


def test_an_unknown_impl_is_refused_before_anything_runs(make_cfg):
    from qtrain.errors import ConfigError
    from qtrain.run.validate import validate

    with pytest.raises(ConfigError, match="act.impl must be one of reference, compact"):
        validate(make_cfg("act.impl=fast"))
