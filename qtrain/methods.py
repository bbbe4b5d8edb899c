"""How weights move: float, STE (BinaryConnect), BinaryRelax and BCGD (SPEC §3).

Every method keeps the latent float weights w in the model's parameters between steps (so the
optimizer, weight decay and checkpoints all act on w) and only swaps in a surrogate u for the
forward and backward pass. :class:`Method` lists the hooks and when the loop
(qtrain/train/loop.py) calls them; :class:`Float` is the method with no weight quantization, and
the others extend it. Everything a method does around the optimizer step happens in
``before_step`` / ``after_step``, learned activation alphas included: their gradient is scaled
and clipped before the step and their value clamped after it.

Evaluation runs inside the contexts of ``evaluations()``: always at the hard-quantized Q(w),
plus the relaxed u during BinaryRelax phase I. Q(w) is computed once per step per layer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Protocol

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.quant.act import QuantReLU, clamp_learned_alphas, scale_alpha_gradients

log = logging.getLogger("qtrain")


class Method(Protocol):
    """What the loop calls, and when. For every batch::

        method.prepare_forward()     # u := surrogate(w), installed into the quantized parameters
        loss = task.loss(model(x), y)
        loss.backward()              # the gradient at u (the coarse gradient)
        method.before_step()         # w restored (BCGD: w <- (1-rho) w + rho Q(w)); learned alphas'
                                     # gradients scaled and clipped
        optimizer.step()             # updates w (and the learned alphas)
        method.after_step()          # learned alphas clamped to their range

    Around each epoch: ``on_epoch_start(epoch)`` before its first batch, and ``on_epoch_end(epoch)``
    after its evaluations, returning scalars to log. The epoch's test numbers are measured inside
    each context of ``evaluations()``. ``state_dict`` / ``load_state_dict`` carry the method's own
    state in every checkpoint, so a resumed run continues exactly.
    """

    name: str

    def attach(self, model: nn.Module, quantizer=None, names=()) -> None:
        """Take the model (its ``names`` weights quantized by ``quantizer``) before training starts."""

    def prepare_forward(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def on_epoch_end(self, epoch: int) -> dict: ...

    def evaluations(self) -> list[tuple[str, ContextManager]]:
        """(tag prefix, context) pairs; 'test' is the reported number."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Float:
    """No weight quantization: u = w. The base of the other methods (learned alphas, logging)."""

    name = "float"

    def attach(self, model: nn.Module, quantizer=None, names=()) -> None:
        self.model = model
        if quantizer is not None and names:
            raise ConfigError("method=float trains float weights, but wbits is set. Use method=ste, binaryrelax "
                              "or bcgd for quantized weights, or wbits=null for float weights.")

    def prepare_forward(self):
        pass

    def before_step(self):
        # here, not in a gradient hook: in a data-parallel run the clip must act on the gradient of the
        # whole batch, after DistributedDataParallel has averaged the ranks' ones
        scale_alpha_gradients(self.model)

    def after_step(self):
        clamp_learned_alphas(self.model)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int) -> dict:
        """alpha/mean and alpha/<layer> for every learned alpha (a shared one under its first layer)."""
        named = {}
        for name, m in self.model.named_modules():
            if isinstance(m, QuantReLU) and isinstance(m.alpha, nn.Parameter):
                named.setdefault(id(m.alpha), (name, float(m.alpha.detach())))
        if not named:
            return {}
        values = [v for _, v in named.values()]
        return {"alpha/mean": sum(values) / len(values), **{f"alpha/{n}": v for n, v in named.values()}}

    def evaluations(self):
        """(tag prefix, context) pairs; 'test' is the reported number."""
        return [("test", contextlib.nullcontext())]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class STE(Float):
    """BinaryConnect: forward and backward at u = Q(w); the optimizer updates the latent w."""

    name = "ste"

    def attach(self, model, quantizer=None, names=()):
        if quantizer is None or not names:
            raise ConfigError(f"method={self.name} quantizes weights, so it needs wbits (1 = binary, 2 = ternary, "
                              "k >= 3 = k-bit), e.g. wbits=1; for float weights use method=float.")
        self.model, self.quantizer = model, quantizer
        params = dict(model.named_parameters())
        self.names = list(names)
        self.params = [params[n] for n in self.names]
        self._latent = [torch.empty_like(p) for p in self.params]
        self._q = [torch.empty_like(p) for p in self.params]
        self._codes_at_epoch_start = None

    # -- the surrogate ---------------------------------------------------------------------------
    def surrogate(self, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @torch.no_grad()
    def prepare_forward(self):
        # foreach: one call over all layers instead of one per layer (on a GPU, one kernel launch for all)
        torch._foreach_copy_(self._latent, self.params)
        for p, q in zip(self.params, self._q):  # Q(w): a projection per layer, each with its own scale
            q.copy_(self.quantizer(p))
        torch._foreach_copy_(self.params, [self.surrogate(latent, q) for latent, q in zip(self._latent, self._q)])

    def before_step(self):
        self.restore_latent()
        super().before_step()

    @torch.no_grad()
    def restore_latent(self):
        """The optimizer steps w, not u: put the latent weights back (BCGD blends them first)."""
        torch._foreach_copy_(self.params, self._latent)

    # -- evaluation --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _installed(self, relaxed: bool):
        """Temporarily put Q(w) (or the relaxed u) into the parameters; w is restored after."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, w in zip(self.params, saved):
                    q = self.quantizer(w)
                    p.copy_(self.surrogate(w, q) if relaxed else q)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved):
                    p.copy_(w)

    def evaluations(self):
        return [("test", self._installed(relaxed=False))]

    # -- diagnostics -------------------------------------------------------------------------------
    @torch.no_grad()
    def _codes(self):
        """Each weight's integer level q / delta (delta = the smallest non-zero |q|), to count changes."""
        out = []
        for p in self.params:
            q = self.quantizer(p)
            unit = torch.where(q != 0, q.abs(), torch.inf).min()
            out.append(torch.round(q / unit).to(torch.int16))
        return out

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        # resumed mid-epoch: the codes at the start of this epoch came with the checkpoint
        restored, self._restored_codes = getattr(self, "_restored_codes", None), None
        self._codes_at_epoch_start = restored if restored is not None else self._codes()

    def on_epoch_end(self, epoch):
        scalars = super().on_epoch_end(epoch)
        if self._codes_at_epoch_start is not None:
            now = self._codes()
            per_layer = [int((a != b).sum()) for a, b in zip(now, self._codes_at_epoch_start)]
            scalars["weights/changed_fraction"] = sum(per_layer) / sum(p.numel() for p in self.params)
            for name, p, changed in zip(self.names, self.params, per_layer):  # sign or level changed this epoch
                scalars[f"weights_changed/{name.removesuffix('.weight')}"] = changed / p.numel()
        self._codes_at_epoch_start = None  # an epoch-end checkpoint needs none
        return scalars

    def state_dict(self):
        return {"codes_at_epoch_start": self._codes_at_epoch_start}

    def load_state_dict(self, state):
        self._restored_codes = state.get("codes_at_epoch_start")


class BinaryRelax(STE):
    """[BR]: phase I at u = (lambda Q(w) + w) / (lambda + 1), lambda = lambda0 * growth^epoch;
    after ``phase2_epoch`` phase-I epochs (logged epochs 1..phase2_epoch), phase II at u = Q(w).
    Defaults: the authors' notebook."""

    name = "binaryrelax"

    def __init__(self, lambda0: float = 1.0, growth: float = 1.04, phase2_epoch: int = 150):
        if lambda0 <= 0 or growth < 1:
            raise ConfigError(f"binaryrelax needs lambda0 > 0 and growth >= 1 (got {lambda0}, {growth}).")
        self.lambda0, self.growth, self.phase2_epoch = lambda0, growth, int(phase2_epoch)
        self.lam = lambda0
        self.epoch = 0

    @property
    def phase(self) -> int:
        return 1 if self.epoch < self.phase2_epoch else 2

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        self.lam = self.lambda0 * self.growth ** min(epoch, self.phase2_epoch)
        if epoch == self.phase2_epoch:  # epoch is 0-based here; the logs count from 1
            log.info("binaryrelax: phase II (u = Q(w)) from epoch %d on, after %d phase-I epochs", epoch + 1, epoch)

    def surrogate(self, w, q):
        if self.phase == 2:
            return q
        return (self.lam * q + w) / (self.lam + 1)

    def evaluations(self):
        evals = super().evaluations()
        if self.phase == 1:
            evals.append(("test_relaxed", self._installed(relaxed=True)))
        return evals

    def on_epoch_end(self, epoch):
        return {**super().on_epoch_end(epoch), "binaryrelax/lambda": self.lam, "binaryrelax/phase": self.phase}

    def state_dict(self):
        return {**super().state_dict(), "lam": self.lam, "epoch": self.epoch}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.lam, self.epoch = state["lam"], state["epoch"]


class BCGD(STE):
    """[BCGD]: gradient at Q(w); before each step blend w <- (1 - rho) w + rho Q(w).

    So w+ = (1 - rho) w + rho Q(w) - lr * grad f(Q(w)) for plain SGD; rho = 0 is BinaryConnect.
    """

    name = "bcgd"

    def __init__(self, rho: float = 1e-5):
        if not 0 <= rho <= 1:
            raise ConfigError(f"bcgd needs 0 <= rho <= 1, got {rho}.")
        self.rho = rho

    @torch.no_grad()
    def restore_latent(self):
        torch._foreach_mul_(self._latent, 1 - self.rho)  # w <- (1 - rho) w + rho Q(w), all layers at once
        torch._foreach_add_(self._latent, self._q, alpha=self.rho)
        torch._foreach_copy_(self.params, self._latent)

    def on_epoch_end(self, epoch):
        return {**super().on_epoch_end(epoch), "bcgd/rho": self.rho}
