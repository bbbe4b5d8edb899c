"""The coarse gradient of qtrain's STE autograd on the two-layer model matches SPEC §5's closed forms."""

import math

import pytest
import torch

from qtrain import theory

M, N = 5, 12


def problem(seed):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(N, generator=g, dtype=torch.float64)
    w_star /= w_star.norm()
    v_star = torch.randn(M, generator=g, dtype=torch.float64)
    v = torch.randn(M, generator=g, dtype=torch.float64)
    w = 1.7 * torch.randn(N, generator=g, dtype=torch.float64)
    z = torch.randn(200_000, M, N, generator=g, dtype=torch.float64)
    return v, w, v_star, w_star, z


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ste,closed", [("identity", theory.expected_coarse_grad_identity),
                                        ("relu", theory.expected_coarse_grad_relu)])
def test_autograd_coarse_gradient_matches_closed_form(seed, ste, closed):
    v, w, v_star, w_star, z = problem(seed)
    _, g_v, g_w = theory.coarse_gradients(v, w, v_star, w_star, ste, z)
    expected = closed(v, w, v_star, w_star)
    assert cos(g_w, expected) > 0.99
    assert float((g_w - expected).norm() / expected.norm()) < 0.05
    # the v-gradient involves no estimator: it matches the population gradient
    assert float((g_v - theory.grad_v(v, w, v_star, w_star)).norm() / g_v.norm()) < 0.05


def test_population_loss_closed_form_matches_samples():
    v, w, v_star, w_star, z = problem(2)
    f = theory.population_loss(v, w, v_star, w_star)
    assert float(theory.empirical_loss(v, w, v_star, w_star, z)) == pytest.approx(float(f), rel=0.03)


@pytest.mark.parametrize("seed", range(10))
def test_relu_coarse_gradient_is_a_descent_direction(seed):
    v, w, v_star, w_star, _ = problem(seed)
    if abs(float(v @ v_star)) < 1e-3:
        pytest.skip("at a critical point in w")
    inner = theory.expected_coarse_grad_relu(v, w, v_star, w_star) @ theory.grad_w(v, w, v_star, w_star)
    assert float(inner) > 0


def test_identity_coarse_gradient_does_not_vanish_at_spurious_minimum():
    g = torch.Generator().manual_seed(3)
    w_star = torch.randn(N, generator=g, dtype=torch.float64)
    w_star /= w_star.norm()
    v_star = torch.randn(M, generator=g, dtype=torch.float64) + 0.5
    v = theory.spurious_minimum_v(v_star)
    w = -w_star  # theta = pi
    norm = theory.expected_coarse_grad_identity(v, w, v_star, w_star).norm()
    s = float(v_star.sum())
    assert float(norm) == pytest.approx(2 * (M - 1) * s * s / (math.sqrt(2 * math.pi) * (M + 1) ** 2), rel=1e-9)
    # the relu STE's expected coarse gradient does vanish there
    assert float(theory.expected_coarse_grad_relu(v, w, v_star, w_star).norm()) < 1e-9
