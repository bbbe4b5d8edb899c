"""Figures for the two-linear-layer theory of [STE] §2-3 (SPEC §5), written to docs/.

1. docs/ste_fig1_one_step.png — [STE] Figure 1: the empirical loss after one step along the
   negative coarse gradient (relu STE), versus the step size eta in [0, 0.2], for 10, 50 and 1000
   samples. The paper does not give m, n, v* or the start; ours: m = 20, n = 50, v* and w* drawn
   from seed 0 (w* unit), the start (v, w) drawn from seed 1.
2. docs/ste_cgd_population.png — coarse gradient descent on the population loss (closed form)
   started near a spurious minimum (theta = pi - 0.05, v at the spurious v plus noise), for the
   identity, relu and clipped_relu STEs. The w-update uses E[g] in closed form for identity and relu
   (SPEC §5); clipped_relu has no closed form there, so its E[g] is the average over a fixed
   sample of 20,000 Gaussian inputs, backpropagated through qtrain's own STE Function. The v-update
   is the exact population gradient. m = 5, n = 10, eta = 0.05.

Usage: python scripts/theory_figures.py [--out docs]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qtrain import theory  # noqa: E402

torch.set_default_dtype(torch.float64)


def unit(x):
    return x / x.norm()


def figure_one_step(out: Path) -> None:
    m, n = 20, 50
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    w_star, v_star = unit(torch.randn(n, generator=g0)), torch.randn(m, generator=g0)
    w, v = torch.randn(n, generator=g1), torch.randn(m, generator=g1)
    etas = torch.linspace(0, 0.2, 401)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, samples in zip(axes, (10, 50, 1000)):
        z = torch.randn(samples, m, n, generator=torch.Generator().manual_seed(100 + samples))
        _, g_v, g_w = theory.coarse_gradients(v, w, v_star, w_star, "relu", z)
        losses = [float(theory.empirical_loss(v - e * g_v, w - e * g_w, v_star, w_star, z)) for e in etas]
        ax.plot(etas, losses, lw=1.2)
        ax.set_title(f"{samples} samples")
        ax.set_xlabel("step size $\\eta$")
    axes[0].set_ylabel("empirical loss after one step")
    fig.suptitle("Loss along the negative coarse gradient (relu STE): jagged with few samples, smooth with many")
    fig.tight_layout()
    fig.savefig(out / "ste_fig1_one_step.png", dpi=120)
    plt.close(fig)


def spurious_setup(m, n):
    """A teacher with spurious minima ((1^T v*)^2 < (m+1)/2 ||v*||^2, 1^T v* != 0) and a start near one."""
    g = torch.Generator().manual_seed(3)
    w_star = unit(torch.randn(n, generator=g))
    while True:
        v_star = torch.randn(m, generator=g)
        s = float(v_star.sum())
        if abs(s) > 0.5 and s * s < (m + 1) / 2 * float(v_star @ v_star):
            break
    v0 = theory.spurious_minimum_v(v_star) + 0.01 * torch.randn(m, generator=g)
    # w at angle pi - 0.05 from w*
    perp = unit(torch.randn(n, generator=g) - (torch.randn(n, generator=g) @ w_star) * w_star)
    perp = unit(perp - (perp @ w_star) * w_star)
    w0 = math.cos(math.pi - 0.05) * w_star + math.sin(math.pi - 0.05) * perp
    return v_star, w_star, v0, w0


def figure_cgd(out: Path, steps: int = 600, eta: float = 0.05) -> None:
    m, n = 5, 10
    v_star, w_star, v0, w0 = spurious_setup(m, n)
    z = torch.randn(20_000, m, n, generator=torch.Generator().manual_seed(7))
    coarse = {
        "identity": lambda v, w: theory.expected_coarse_grad_identity(v, w, v_star, w_star),
        "relu": lambda v, w: theory.expected_coarse_grad_relu(v, w, v_star, w_star),
        "clipped_relu": lambda v, w: theory.coarse_gradients(v, w, v_star, w_star, "clipped_relu", z)[2],
    }
    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ste, g_w in coarse.items():
        v, w = v0.clone(), w0.clone()
        losses, thetas = [], []
        for _ in range(steps):
            losses.append(float(theory.population_loss(v, w, v_star, w_star)))
            thetas.append(float(theory.angle(w, w_star)))
            v, w = v - eta * theory.grad_v(v, w, v_star, w_star), w - eta * g_w(v, w)
        ax_f.plot(losses, label=ste)
        ax_t.plot(thetas, label=ste)
    ax_f.set_yscale("log")
    ax_f.set_xlabel("iteration")
    ax_f.set_ylabel("population loss f(v, w)")
    ax_t.set_xlabel("iteration")
    ax_t.set_ylabel("angle(w, w*)")
    ax_t.axhline(math.pi, color="gray", lw=0.6, ls=":")
    ax_f.legend()
    fig.suptitle(f"Coarse gradient descent from near a spurious minimum (m={m}, n={n}, eta={eta})\n"
                 "relu and clipped_relu descend monotonically to the critical point; identity is unstable",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ste_cgd_population.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figure_one_step(args.out)
    figure_cgd(args.out)
    print(f"wrote {args.out / 'ste_fig1_one_step.png'} and {args.out / 'ste_cgd_population.png'}")


if __name__ == "__main__":
    main()
