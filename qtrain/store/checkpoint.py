"""Checkpoint files: written atomically, verified on load, one good predecessor always kept.

A checkpoint is the dict ``torch.save`` writes (so ``torch.load(path, weights_only=False)`` reads
it), plus an ``integrity`` entry: a SHA-256 over every tensor's bytes and every other value, in a
fixed order. :func:`load` recomputes it, so a flipped byte in any tensor is caught, not trained on.

Writing ``name.pt``: serialise to memory (the exact size is known before touching the disk), write
``.name.pt.tmp-<pid>``, fsync, move the current ``name.pt`` to ``name.prev.pt``, rename the
temporary file to ``name.pt``. At every instant one of the two is a complete, verified file.
:func:`load_latest` takes ``name.pt``, else ``name.prev.pt`` with a warning naming the bad file.

A full disk or a read-only folder is one :class:`DiskError` saying which folder and how much was
needed; the temporary file is removed and the previous files stay as they were.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from qtrain.errors import CorruptCheckpoint
from qtrain.fileio import previous_path, write_bytes_atomic

log = logging.getLogger("qtrain")

def _digest(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_digest(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "integrity"}, h)
    return h.hexdigest()


def save(state: dict, path: Path, keep_previous: bool = True) -> None:
    """Save ``state`` with its integrity digest; the file it replaces becomes ``*.prev.pt``."""
    state = {**state, "integrity": {"sha256": content_digest(state), "version": 1}}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue(), keep_previous=keep_previous)


def problem(path: Path) -> tuple[dict | None, str | None]:
    """(state, None) for a good checkpoint, (None, what is wrong) otherwise."""
    path = Path(path)
    if not path.exists():
        return None, "missing"
    try:
        # weights_only=False: the checkpoint holds Python RNG states and the config, not only tensors
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or garbage file fails in many different ways
        return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if not isinstance(state, dict):
        return None, "not a qtrain checkpoint (not a dict)"
    integrity = state.get("integrity")
    if integrity is None:
        return state, None  # written before checksums existed: accepted as it is
    if content_digest(state) != integrity.get("sha256"):
        return None, "its checksum does not match its content (the file was damaged after it was written)"
    return state, None


def load(path: Path) -> dict:
    state, why = problem(path)
    if state is None:
        raise CorruptCheckpoint(f"The checkpoint {path} is {why}. Give another checkpoint, or delete the run "
                                "folder to train it again.")
    return state


def load_latest(path: Path) -> tuple[dict, Path]:
    """``path`` if it is good, else its ``.prev`` with a warning; one paragraph when neither is."""
    state, why = problem(path)
    if state is not None:
        return state, Path(path)
    prev = previous_path(path)
    prev_state, prev_why = problem(prev)
    if prev_state is not None:
        log.warning("checkpoint %s is %s; falling back to the previous one, %s (epoch %s)", path, why, prev,
                    prev_state.get("epoch"))
        return prev_state, prev
    raise CorruptCheckpoint(f"No usable checkpoint in {Path(path).parent}: {Path(path).name} is {why} and "
                            f"{prev.name} is {prev_why}. The run cannot be continued; start it again without "
                            "resume (or delete that run folder).")


def has_checkpoint(path: Path) -> bool:
    return Path(path).exists() or previous_path(path).exists()
