"""Straight-through estimators: forward levels and backward masks by hand-computed values."""

import pytest
import torch

from qtrain.quant.act import AUTHORS_ALPHA, QuantReLU, optimal_alpha, scale_alpha_gradients
from qtrain.quant.ste import STES, staircase


def grad_of(ste, x, alpha=1.0, bits=1):
    x = torch.tensor(x, requires_grad=True)
    STES[ste].apply(x, torch.tensor(alpha), bits, "ceil", None).sum().backward()
    return x.grad.tolist()


def test_masks_one_bit():
    # DESIGN example 2: x = [-1, .5, 2], alpha = 1, 1 bit
    assert grad_of("identity", [-1.0, 0.5, 2.0]) == [1, 1, 1]
    assert grad_of("relu", [-1.0, 0.5, 2.0]) == [0, 1, 1]
    assert grad_of("clipped_relu", [-1.0, 0.5, 2.0]) == [0, 1, 0]


def test_clipped_mask_edges_two_bits():
    # 2 bits, alpha = 0.5: clip at 3 * 0.5 = 1.5; the mask is 1 on (0, 1.5] including the top edge
    x = [-0.1, 0.0, 0.01, 1.0, 1.5, 1.51, 3.0]
    assert grad_of("clipped_relu", x, 0.5, 2) == [0, 0, 1, 1, 1, 0, 0]
    assert grad_of("relu", x, 0.5, 2) == [0, 0, 1, 1, 1, 1, 1]
    assert grad_of("identity", x, 0.5, 2) == [1] * 7


def test_ceil_staircase_levels():
    a = torch.tensor(0.5)
    x = torch.tensor([-3.0, 0.0, 0.1, 0.5, 0.51, 1.0, 1.2, 1.5, 1.6, 9.0])
    # k = clamp(ceil(x / 0.5), 0, 3): (k-1) alpha < x <= k alpha -> k alpha
    expected = [0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5]
    assert staircase(x, a, 2).tolist() == expected
    assert staircase(x, a, 2, "nearest").tolist() == [0, 0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_number_of_levels(bits):
    y = staircase(torch.linspace(-5, 5, 10001), torch.tensor(0.1), bits)
    assert torch.unique(y).numel() == 2**bits


def test_staircase_exact_under_bf16_autocast():
    x = torch.randn(1000)
    a = torch.tensor(0.1946)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = staircase(x, a, 4)
    assert y.dtype == torch.float32
    assert torch.equal(y, staircase(x, a, 4))


def test_learned_alpha_gradients_mean_and_exact():
    x = torch.tensor([-1.0, 0.2, 0.7, 2.0])  # 2 bits, alpha 0.5: levels k = 0, 1, 2, 3 (clipped)
    for mode, want in (("mean", 0 + 2 + 2 + 3), ("exact", 0 + 1 + 2 + 3)):
        act = QuantReLU(2, 0.5, "clipped_relu", learn_alpha=True, alpha_grad=mode, alpha_grad_scale=1.0,
                        alpha_grad_clip=100.0)
        act(x).sum().backward()
        assert act.alpha.grad.item() == pytest.approx(want)


def test_alpha_gradient_scaled_and_clipped():
    act = QuantReLU(2, 0.5, "clipped_relu", learn_alpha=True)  # defaults: x0.01, clip to [-1, 1]
    act(torch.full((1000,), 2.0)).sum().backward()  # raw gradient 3000
    assert act.alpha.grad.item() == pytest.approx(3000.0)
    scale_alpha_gradients(act)  # before the optimizer step (every method's before_step calls it)
    assert act.alpha.grad.item() == pytest.approx(1.0)


def test_proxy_ste_uses_autograd_derivative():
    act = QuantReLU(2, 0.5, "proxy", proxy=torch.tanh)
    x = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    act(x).sum().backward()
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_optimal_alpha_reproduces_authors_table():
    # The authors' alphas are MSE-optimal round-to-nearest steps for N(0,1) inputs (SPEC §1).
    for bits, alpha in AUTHORS_ALPHA.items():
        assert optimal_alpha(bits, "nearest") == pytest.approx(alpha, rel=0.01)
    assert optimal_alpha(2, "ceil") < optimal_alpha(2, "nearest")


def test_compiled_and_eager_quantizer_agree_exactly():
    torch.manual_seed(0)
    act = QuantReLU(4, 0.1946, "clipped_relu", learn_alpha=True, alpha_grad_scale=1e-6)
    compiled = torch.compile(act)
    x = torch.randn(32, 8, 6, 6) * 2
    g = torch.randn_like(x)
    outs = []
    for fn in (act, compiled):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad, act.alpha.grad.clone()))
        act.alpha.grad = None
    (y1, gx1, ga1), (y2, gx2, ga2) = outs
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)  # levels and STE masks: exactly
    assert torch.allclose(ga1, ga2, rtol=1e-5)  # alpha's gradient is a float sum: order may differ


def test_docstring_example():
    import doctest

    import qtrain.quant.ste

    assert doctest.testmod(qtrain.quant.ste).failed == 0


def test_unknown_alpha_gradient_proxy_is_refused():
    from qtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="act.alpha_grad"):
        QuantReLU(2, 0.5, learn_alpha=True, alpha_grad="mean2")


@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_exact_alpha_gradient_is_the_forward_level_index(rounding):
    # alpha = 0.1946 is not a dyadic number: the proxy must be the integer level k itself
    x = torch.tensor([-1.0, 0.05, 0.1, 0.3, 0.41, 2.0, 9.0])
    act = QuantReLU(4, 0.1946, "clipped_relu", rounding=rounding, learn_alpha=True, alpha_grad="exact",
                    alpha_grad_scale=1.0, alpha_grad_clip=1e9)
    act(x).sum().backward()
    from qtrain.quant.ste import levels

    k = levels(x, torch.tensor(0.1946), 4, rounding)
    assert torch.equal(k, k.round()) and act.alpha.grad.item() == pytest.approx(float(k.sum()), abs=0)


def test_clipped_mask_compares_in_float32_under_bf16():
    # 2.921875 is exactly representable in bf16 and lies above 15 * 0.1946 = 2.919: outside the range
    from qtrain.quant.ste import clipped_relu_mask

    x = torch.tensor([2.921875, 2.9, -0.1], dtype=torch.bfloat16)
    mask = clipped_relu_mask(x, torch.tensor(0.1946), 4)
    assert mask.tolist() == [0.0, 1.0, 0.0]
