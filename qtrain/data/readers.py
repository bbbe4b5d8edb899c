"""Reading dataset files safely: idx and .npz arrays, checked before use, and one error that says
where qtrain looked and what it expected when a dataset is missing."""

from __future__ import annotations

import gzip
import os

import numpy as np

from qtrain.errors import DataError


def missing_error(name: str, looked: list[str], expected: str, how: str,
                  download: str = "cannot be downloaded here") -> DataError:
    """``download``: what became of fetching it (qtrain.data.download), for the datasets that can be."""
    places = ", ".join(looked)
    return DataError(
        f"{name} was not found (looked at {places}) and {download}. Expected {expected}. "
        f"{how} Point qtrain at the folder with data.root=/abs/path or the QTRAIN_DATA environment variable."
    )


IDX_DTYPE = 0x08  # unsigned byte: the only element type MNIST-style idx files use


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) of ``ndim`` dimensions into a uint8 array; anything
    else (a truncated, empty or garbage file, labels in place of images) is a DataError."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read as an idx file: {e}. Replace it with an intact copy.") from None
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_DTYPE or raw[3] != ndim:
        what = "images [N, rows, cols]" if ndim == 3 else "labels [N]"
        raise DataError(f"{path} is not an idx file of {what}: its header is {raw[:4].hex() or 'empty'} "
                        f"(expected 0000080{ndim}). Check that the file is the right one and intact.")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = len(raw) - 4 - 4 * ndim
    if body != int(np.prod(dims)) or dims[0] == 0:
        raise DataError(f"{path} is truncated or malformed: its header says {dims} ({int(np.prod(dims))} bytes) but "
                        f"{body} bytes follow. Replace it with an intact copy.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def check_arrays(source: str, tx, ty, vx, vy, num_classes: int, image_shape: tuple | None = None) -> None:
    """uint8 images, integer labels in [0, num_classes), one label per image, at least one sample."""
    for split, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.dtype != np.uint8:
            raise DataError(f"{source}: {split} images must be uint8 (0-255), got {x.dtype}. Convert them "
                            "(e.g. (x * 255).round().astype(np.uint8) for images in [0, 1]).")
        if image_shape is not None and tuple(x.shape[1:]) != image_shape:
            raise DataError(f"{source}: {split} images must have shape [N, {', '.join(map(str, image_shape))}], "
                            f"got {list(x.shape)}.")
        if len(x) == 0:
            raise DataError(f"{source}: the {split} split has no samples.")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{source}: {len(x)} {split} images but labels of shape {list(y.shape)}; one label per "
                            "image is needed.")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{source}: {split} labels must be integers in [0, {num_classes - 1}], got "
                            f"{y.dtype} values from {y.min()} to {y.max()}.")


NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")


def load_npz_arrays(path: str) -> list[np.ndarray]:
    """train_x, train_y, test_x, test_y from an .npz file; a damaged or incomplete file is a DataError."""
    try:
        with np.load(path) as f:
            return [f[k] for k in NPZ_KEYS]
    except KeyError as e:
        raise DataError(f"{path} lacks the array {e}; it needs {', '.join(NPZ_KEYS)}.") from None
    except Exception as e:  # truncated, empty or not a zip: numpy raises many kinds
        raise DataError(f"{path} cannot be read as a .npz array file ({type(e).__name__}: {e}). Replace it with "
                        "an intact copy.") from None




def resolve_root(root) -> str:
    """An absolute data root; an empty one (an empty $QTRAIN_DATA) counts as unset: ./data."""
    return os.path.abspath(os.path.expanduser(str(root or "").strip() or "data"))
