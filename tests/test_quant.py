"""Weight quantizers: allowed values, projection property (vs brute force), idempotence; layer rules."""

import itertools

import pytest
import torch
from torch import nn

from qtrain.models.lenet import LeNet5
from qtrain.models.resnet import resnet18, resnet20
from qtrain.models.vgg import VGG
from qtrain.quant.act import ActLayer
from qtrain.quant.rules import quantized_weight_names
from qtrain.quant.weight import binary, make_weight_quantizer, ternary, ternary_twn, uniform, uniform_alternating


def dist(a, b):
    return float(((a - b) ** 2).sum())


@pytest.mark.parametrize("bits,max_values", [(1, 2), (2, 3), (3, 7), (4, 15)])
def test_number_of_distinct_values(bits, max_values):
    q = make_weight_quantizer(bits)(torch.randn(64, 32, 3, 3))
    assert torch.unique(q).numel() <= max_values
    assert torch.unique(q).numel() >= min(max_values, 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_idempotent(bits):
    q = make_weight_quantizer(bits)
    w = torch.randn(500, dtype=torch.float64)
    assert torch.allclose(q(q(w)), q(w), atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_binary_is_projection_onto_plus_minus_delta(seed):
    w = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = dist(w, binary(w))
    for signs in itertools.product((-1.0, 1.0), repeat=6):
        s = torch.tensor(signs, dtype=torch.float64)
        delta = max(float(w @ s) / 6, 0.0)  # best delta for this sign pattern
        assert dist(w, delta * s) >= ours - 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_ternary_is_exact_projection(seed):
    w = torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = dist(w, ternary(w))
    for codes in itertools.product((-1.0, 0.0, 1.0), repeat=7):
        s = torch.tensor(codes, dtype=torch.float64)
        if s.abs().sum() == 0:
            continue
        delta = max(float(w @ s) / float(s.abs().sum()), 0.0)
        assert dist(w, delta * s) >= ours - 1e-12
    # TWN's rule is only an approximation: never better than the exact projection
    assert dist(w, ternary_twn(w)) >= ours - 1e-12


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_uniform_no_better_delta_on_a_fine_grid(bits, seed):
    w = torch.randn(40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = 2 ** (bits - 1) - 1
    ours = dist(w, uniform(w, bits))
    for delta in torch.linspace(1e-3, float(w.abs().max()), 4000, dtype=torch.float64):
        q = torch.sign(w) * torch.round(w.abs() / delta).clamp(0, m) * delta  # best codes for this delta
        assert dist(w, q) >= ours - 1e-9
    assert dist(w, uniform_alternating(w, bits)) >= ours - 1e-9  # the authors' rule: never better


def _names(model):
    return quantized_weight_names(model, "all"), quantized_weight_names(model, "all_but_last"), \
        quantized_weight_names(model, "all_but_first_last")


@pytest.mark.parametrize("make,shape", [
    (lambda a: LeNet5(10, (1, 28, 28), a), (1, 28, 28)),
    (lambda a: VGG(10, (3, 32, 32), a), (3, 32, 32)),
    (lambda a: resnet20(10, (3, 32, 32), a), (3, 32, 32)),
    (lambda a: resnet18(10, (3, 32, 32), a), (3, 32, 32)),
])
def test_quantized_layer_rules(make, shape):
    model = make(ActLayer(bits=2, alpha=0.65))
    everything, default, inner = _names(model)
    convs_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert everything == [f"{n}.weight" for n in convs_linears]
    last_fc = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + ".weight"
    assert default == [n for n in everything if n != last_fc]          # first conv quantized, head float
    assert inner == [n for n in everything if n not in (last_fc, everything[0])]
    params = dict(model.named_parameters())
    for n in everything:  # only weights, never biases or BN parameters
        assert n.endswith(".weight") and params[n].dim() >= 2


def test_one_learned_alpha_per_resnet_block():
    def n_alphas(share):
        act = ActLayer(bits=4, alpha=0.2, learn_alpha=True, share_block_alpha=share)
        model = resnet20(10, (3, 32, 32), act)
        return sum(1 for n, _ in model.named_parameters() if n.endswith("alpha"))

    assert n_alphas(False) == 1 + 2 * 9  # stem + two per block
    assert n_alphas(True) == 1 + 9


def test_projections_survive_extreme_scales():
    from qtrain.quant.weight import binary, ternary, uniform

    big = torch.tensor([1e19, -1e19, 1e19])
    assert torch.equal(ternary(big), big)  # no entry dropped by an overflowing (sum)^2
    tiny = torch.tensor([1e-21, -2e-21, 3e-21, 0.0])
    assert (ternary(tiny) != 0).sum() >= 2 and torch.isfinite(ternary(tiny)).all()
    q = uniform(torch.tensor([1e19, -3e19, 2e19]), 3)
    assert torch.allclose(q, torch.tensor([1e19, -3e19, 2e19]), rtol=1e-6)
    assert len(binary(tiny).unique()) == 2
