"""The bytes autograd keeps for the backward pass of one training forward, per variant: counted with
``torch.autograd.graph.saved_tensors_hooks`` (any device), each storage once (a tensor saved by two ops,
e.g. an activation's output that the next convolution also keeps, counts once)."""

from __future__ import annotations

import torch


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in ``model(x)`` (train mode), parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())
