"""Closed forms for the two-linear-layer model of [STE] §2-3 (SPEC §5), and the coarse gradient
that qtrain's own STE autograd produces on it (to check one against the other).

Model: y = v^T sigma(Z w), sigma(x) = 1{x > 0}, Z in R^{m x n} with N(0,1) entries; teacher
y* = v*^T sigma(Z w*), ||w*|| = 1; loss 1/2 (y - y*)^2. theta = angle(w, w*).
All functions take float64 tensors v, w, v_star, w_star.
"""

from __future__ import annotations

import math

import torch

from qtrain.models.twolayer import TwoLayer
from qtrain.quant.act import ActLayer

SQRT_2PI = math.sqrt(2 * math.pi)


def angle(w, w_star):
    c = torch.dot(w, w_star) / (w.norm() * w_star.norm())
    return torch.arccos(c.clamp(-1.0, 1.0))


def population_loss(v, w, v_star, w_star):
    """f = 1/8 [v^T(I+11^T)v - 2 v^T((1 - 2 theta/pi) I + 11^T) v* + v*^T(I+11^T)v*]."""
    theta = angle(w, w_star)
    s, s_star = v.sum(), v_star.sum()
    return 0.125 * (v @ v + s * s - 2 * ((1 - 2 * theta / math.pi) * (v @ v_star) + s * s_star)
                    + v_star @ v_star + s_star * s_star)


def grad_v(v, w, v_star, w_star):
    """The true partial gradient of f in v (no estimator involved: sigma's output is exact)."""
    theta = angle(w, w_star)
    ones = torch.ones_like(v)
    return 0.25 * (v + v.sum() * ones - (1 - 2 * theta / math.pi) * v_star - v_star.sum() * ones)


def grad_w(v, w, v_star, w_star):
    """The true gradient of f in w (f depends on w through theta only), valid for 0 < theta < pi."""
    theta = angle(w, w_star)
    nw = w.norm()
    u = w / nw
    dtheta = -(w_star - torch.dot(u, w_star) * u) / (nw * torch.sin(theta))
    return (v @ v_star) / (2 * math.pi) * dtheta


def expected_coarse_grad_identity(v, w, v_star, w_star):
    """E[g_identity] = (||v||^2 w/||w|| - (v^T v*) w*) / sqrt(2 pi)."""
    return ((v @ v) * w / w.norm() - (v @ v_star) * w_star) / SQRT_2PI


def expected_coarse_grad_relu(v, w, v_star, w_star):
    """E[g_relu] = h/(2 sqrt(2pi)) w/||w|| - cos(theta/2) (v^T v*)/sqrt(2pi) (w/||w|| + w*)/||w/||w|| + w*||."""
    theta = angle(w, w_star)
    s, s_star = v.sum(), v_star.sum()
    h = v @ v + s * s - s * s_star + v @ v_star
    u = w / w.norm()
    bisector = (u + w_star) / (u + w_star).norm().clamp_min(1e-300)  # 0 at theta = pi, where cos(theta/2) = 0
    return h / (2 * SQRT_2PI) * u - torch.cos(theta / 2) * (v @ v_star) / SQRT_2PI * bisector


def spurious_minimum_v(v_star):
    """v at the spurious minima (theta = pi): (I + 11^T)^{-1} (11^T - I) v*."""
    m = v_star.numel()
    ones = torch.ones(m, m, dtype=v_star.dtype)
    eye = torch.eye(m, dtype=v_star.dtype)
    return torch.linalg.solve(eye + ones, (ones - eye) @ v_star)


def teacher_model(v, w, ste: str) -> TwoLayer:
    """qtrain's TwoLayer model (float64) holding v and w, with the given STE."""
    m, n = v.numel(), w.numel()
    model = TwoLayer(0, (m, n), ActLayer(bits=1, alpha=1.0, ste=ste)).double()
    with torch.no_grad():
        model.w.weight.copy_(w[None])
        model.v.weight.copy_(v[None])
    return model


def coarse_gradients(v, w, v_star, w_star, ste: str, z: torch.Tensor):
    """(loss, g_v, g_w) on the samples z [N, m, n]: backward through qtrain's STE Function."""
    model = teacher_model(v, w, ste)
    y_star = ((z @ w_star) > 0).to(z.dtype) @ v_star
    loss = 0.5 * ((model(z) - y_star) ** 2).mean()
    loss.backward()
    return loss.detach(), model.v.weight.grad[0].clone(), model.w.weight.grad[0].clone()


def empirical_loss(v, w, v_star, w_star, z):
    y = ((z @ w) > 0).to(z.dtype) @ v
    y_star = ((z @ w_star) > 0).to(z.dtype) @ v_star
    return 0.5 * ((y - y_star) ** 2).mean()
