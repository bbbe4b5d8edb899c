"""Fetching a built-in dataset that is missing from its root (``data.download``, on by default for
MNIST and CIFAR-10/100), with torchvision's own download and checksum code.

The files are downloaded into a temporary folder outside the data root and moved into the root only
once torchvision has verified every checksum, so a failed or corrupted download leaves the root as it
was. A root that cannot be written (read-only, another user's, a shared copy) is never written: the
"not found" message then says why nothing was fetched. Without a network the message is the same as
before, with the download's error added.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from qtrain.fileio import write_refused

TIMEOUT_S = 60  # per connection attempt


def writable(root: str) -> str | None:
    """None when files can be created in ``root`` (or in the nearest folder above it that exists, which
    then holds the new root), else why not."""
    folder = Path(root)
    while not folder.exists():
        folder = folder.parent
    refused = write_refused(folder)
    return f"the data root {root} cannot be written ({refused}), so nothing was downloaded into it" if refused else None


def _torchvision_class(name: str, source):
    from torchvision import datasets

    if name == "mnist":
        # torchvision names the folder after the class (<root>/MNIST/raw): the subclass keeps the name
        return type("MNIST", (datasets.MNIST,), {"mirrors": list(source)} if source else {})
    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    return type(base.__name__, (base,), {"url": source} if source else {})


def fetch(name: str, root: str, source=None) -> str | None:
    """Download dataset ``name`` (mnist, cifar10, cifar100) into ``root``; None when it is there now,
    else why not (for the "not found" message). ``source`` replaces torchvision's own location: the
    mirrors' base URLs for MNIST (``data.mirrors``), the archive's URL for CIFAR (``data.url``)."""
    why = writable(root)
    if why:
        return why
    cls = _torchvision_class(name, source)
    timeout = socket.getdefaulttimeout()
    with tempfile.TemporaryDirectory(prefix="qtrain-download-") as tmp:
        try:
            socket.setdefaulttimeout(TIMEOUT_S)  # torchvision's urlopen has none: a silent firewall would hang
            cls(tmp, train=True, download=True)
        except Exception as e:  # no network, a refused connection, a checksum mismatch: torchvision's words
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            return "the download failed: " + " ".join(lines[-3:] or [type(e).__name__])
        finally:
            socket.setdefaulttimeout(timeout)
        folder = "MNIST" if name == "mnist" else cls.base_folder
        for path in sorted((Path(tmp) / folder).rglob("*")):  # verified: into the root, next to what is there
            dest = Path(root) / folder / path.relative_to(Path(tmp) / folder)
            if path.is_file() and not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(dest))
    return None
