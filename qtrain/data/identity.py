"""What a dataset *is*, independent of where it lives: part of a run's fingerprint
(:func:`qtrain.data.dataset_identity` asks each reader which files it reads and hashes them here).

Two folders holding the same files give the same identity; another dataset in the same format
(Fashion-MNIST's idx files under another root) gives another. The identity of file-backed data
is a SHA-256 over each file's name, size and content hash. Content hashes are cached per
(absolute path, size, mtime) in ``$XDG_CACHE_HOME/qtrain/file-hashes.json`` (default
``~/.cache/qtrain``), so the 185 MB CIFAR-10 array file is read once, not at every run start.
Nothing is ever written into the data root.

ImageNet's 1.3 M files are identified by their relative names and sizes only (hashing 150 GB at
every new machine would take longer than an epoch); the docstring of :func:`imagenet_files` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qtrain.errors import DiskError
from qtrain.fileio import write_text_atomic

CHUNK = 1 << 22


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qtrain" / "file-hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: recompute


def _save_cache(cache: dict) -> None:
    try:
        write_text_atomic(cache_path(), json.dumps(cache, indent=0, sort_keys=True))
    except (OSError, DiskError):
        pass  # a read-only home: the hashes are recomputed next time, nothing is lost


def file_sha256(path: str, cache: dict | None = None) -> str:
    st = os.stat(path)
    key = os.path.abspath(path)
    hit = (cache or {}).get(key)
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def content_identity(paths: list[str]) -> str:
    """sha256 over (file name, size, content sha256) of each file, in the order given."""
    cache = _load_cache()
    before = dict(cache)
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.basename(p)}\0{os.path.getsize(p)}\0{file_sha256(p, cache)}\n".encode())
    if cache != before:
        _save_cache(cache)
    return h.hexdigest()[:16]


def imagenet_files(base: str) -> str:
    """Relative names and sizes of every file under ``base`` (no content hash: too large)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(p, base)}\0{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:16]
