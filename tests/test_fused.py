"""act.impl=fused: one kernel pass each way (qtrain/quant/fused_kernel.cpp), 2 bits per element kept
for the backward. Levels, masks and grad_x are bitwise the reference's -- on random inputs, on the ties
x = k alpha and their float neighbours, NaN and signed zeros, in any memory layout and across the
kernel's block boundaries, at any thread count; and so is the learned alpha's gradient (its sums are
torch.sum's over the same values); where there is no kernel, compact.py runs."""

import itertools

import pytest
import torch

from qtrain.quant import fused
from qtrain.quant.act import QuantReLU
from qtrain.run.runner import train_run
from tests.test_compact import inputs, run, saved_bytes

pytestmark = pytest.mark.skipif(not fused.kernels_loaded(), reason="no C++ compiler to build the fused kernels")


@pytest.mark.parametrize("bits,ste,learn,rounding", list(itertools.product(
    (1, 2, 4), ("identity", "relu", "clipped_relu"), (False, True), ("ceil", "nearest"))))
def test_fused_is_bitwise_the_reference(bits, ste, learn, rounding):
    x = torch.cat([inputs(0.1946, bits), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    grad = torch.randn(x.shape)
    grad[::7] *= -1e-30  # tiny negative gradients: 0 * g must stay -0 where the mask is 0
    ref = run("reference", x, bits, ste, learn, "mean", grad, rounding)
    got = run("fused", x, bits, ste, learn, "mean", grad, rounding)
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
            continue
        assert torch.equal(r.nan_to_num(7.0), g.nan_to_num(7.0)) and torch.equal(r.isnan(), g.isnan())
        assert torch.equal(torch.signbit(r), torch.signbit(g))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "grad_in_other_layout"])
def test_any_layout_and_size_across_blocks(layout):
    """An odd element count (a part-filled last code byte) spanning several of the kernel's blocks."""
    x = torch.randn(3, 7, 33, 35) * 2
    grad = torch.randn(x.shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = torch.randn(3, 7, 33, 70)[..., ::2]
    if layout == "grad_in_other_layout":
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous()
    ref = run("reference", x, 4, "clipped_relu", True, "mean", grad)
    got = run("fused", x, 4, "clipped_relu", True, "mean", grad)
    assert all(torch.equal(r, g) for r, g in zip(ref, got))


@pytest.mark.parametrize("ste", ["relu", "clipped_relu", "identity"])
def test_bitwise_at_every_thread_count(ste):
    x, grad = torch.randn(64, 16, 32, 32), torch.randn(64, 16, 32, 32)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ref = run("reference", x, 4, ste, True, "mean", grad)
            got = run("fused", x, 4, ste, True, "mean", grad)
            assert all(torch.equal(r, g) for r, g in zip(ref, got)), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,alpha_grad", [(torch.bfloat16, "mean"), (torch.float32, "exact")])
def test_without_a_kernel_compact_runs_and_is_bitwise_the_reference(dtype, alpha_grad):
    x = inputs(0.1946, 4, dtype)
    grad = torch.randn(x.shape).to(dtype)
    assert not fused.has_kernel(x, alpha_grad)
    ref = run("reference", x, 4, "clipped_relu", True, alpha_grad, grad)
    got = run("fused", x, 4, "clipped_relu", True, alpha_grad, grad)
    assert all(torch.equal(r, g) for r, g in zip(ref, got))


@pytest.mark.parametrize("ste,learn", [("clipped_relu", False), ("relu", False), ("clipped_relu", True)])
def test_fused_keeps_a_sixteenth_of_the_bytes(ste, learn):
    n = 128 * 16 * 32 * 32
    assert saved_bytes("fused", ste, learn) <= n // 4 + 64  # 2 bits per element (the reference: 32)
    assert saved_bytes("fused", "identity", False) <= 64  # identity without a learned alpha: nothing


@pytest.mark.parametrize("method", [["method=ste", "ste=relu", "abits=2"], ["method=bcgd", "abits=4", "act.learn_alpha=true"]])
def test_a_short_run_is_bitwise_the_reference(make_cfg, mnist_root, tmp_path, method):
    common = ["epochs=1", "data.limit_train=96", "data.limit_test=32", "data.batch_size=32", "wbits=1", *method,
              f"data.root={mnist_root}"]
    states = []
    for impl in ("reference", "fused"):
        train_run(make_cfg(*common, f"act.impl={impl}"), tmp_path / impl)
        states.append(torch.load(tmp_path / impl / "checkpoints" / "last.pt", weights_only=False))
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])


def test_act_impl_is_not_part_of_a_runs_identity(make_cfg):
    """The same results: resume=true continues a reference run under fused, and the reverse."""
    from qtrain.run.resume import fingerprint

    for overrides in (["method=ste", "wbits=1", "abits=4"], ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true"]):
        assert len({fingerprint(make_cfg(*overrides, f"act.impl={i}")) for i in ("reference", "compact", "fused")}) == 1


@pytest.mark.parametrize("ste,learn", [("clipped_relu", True), ("relu", False), ("identity", True)])
def test_in_place_over_an_intermediate_is_bitwise_the_reference(ste, learn):
    """As the models build it (implemented_by(..., inplace=True)): the levels replace the input tensor."""
    w, grad = torch.randn(32, 16, 9, 9, requires_grad=True), torch.randn(32, 16, 9, 9)
    results = []
    for act in (QuantReLU(4, 0.1946, ste, learn_alpha=learn),
                QuantReLU(4, 0.1946, ste, learn_alpha=learn).implemented_by("fused", inplace=True)):
        w.grad = None
        x = (w * 1.5).contiguous(memory_format=torch.channels_last)
        y = act(x)
        y.backward(grad)
        results.append((y.detach().clone(), w.grad.clone(), act.alpha.grad if learn else torch.zeros(())))
        shares = y.data_ptr() == x.data_ptr()
    assert shares  # (the fused one wrote over x)
    assert all(torch.equal(r, g) for r, g in zip(*results))


def test_in_place_is_refused_by_autograd_where_the_input_is_still_needed():
    act = QuantReLU(4, 0.1946).implemented_by("fused", inplace=True)
    w = torch.randn(1000, requires_grad=True)
    x = w * 1.0
    kept = x * x  # saves x for its backward
    y = act(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + kept.sum()).backward()


def test_a_leaf_or_a_view_is_never_written_over():
    act = QuantReLU(4, 0.1946).implemented_by("fused", inplace=True)
    leaf = torch.randn(100)
    before = leaf.clone()
    act(leaf)
    base = torch.randn(4, 100) * 1.0
    view_before = base.clone()
    act(base[1])
    assert torch.equal(leaf, before) and torch.equal(base, view_before)
