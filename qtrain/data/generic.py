"""Any image dataset in a format qtrain already reads, chosen by config alone: ``data=idx`` (MNIST-style
idx files: Fashion-MNIST, KMNIST, EMNIST, ...) and ``data=npz`` (one array file: SVHN or your own).

    qtrain data=idx data.folder=FashionMNIST/raw model=lenet5
    qtrain data=npz data.file=svhn.npz data.num_classes=10 model=resnet20 data.augment=crop_flip

Images are uint8 ([N, H, W] gray or [N, H, W, C] / [N, C, H, W] by ``layout``), labels integers in
[0, num_classes). The normalisation mean/std are the config's when given, else computed once from
the training split and cached by the dataset's content hash (``$XDG_CACHE_HOME/qtrain/stats-*.json``).
Nothing is written into the data root.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from qtrain.data.identity import cache_path, content_identity
from qtrain.data.loaders import Loading, image_bundle
from qtrain.data.readers import check_arrays, load_npz_arrays, read_idx, resolve_root
from qtrain.errors import DataError, DiskError
from qtrain.fileio import write_text_atomic

IDX_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _idx_paths(root: str, folder: str, files) -> tuple[list[str | None], list[str]]:
    base = os.path.join(root, folder or "")
    found, looked = [], []
    for key in IDX_KEYS:
        stem = os.path.join(base, files[key])
        looked.append(stem)
        found.append(next((p for p in (stem, stem + ".gz") if os.path.exists(p)), None))
    return found, looked


def _npz_path(root: str, file: str) -> str:
    return file if os.path.isabs(file) else os.path.join(root, file)


def files_of(name: str, root: str, data_cfg) -> list[str] | None:
    """The files ``data=idx`` / ``data=npz`` read (for the dataset identity), or None if missing."""
    if name == "idx":
        found, _ = _idx_paths(root, data_cfg.get("folder"), data_cfg.files)
        return None if None in found else found
    path = _npz_path(root, str(data_cfg.file))
    return [path] if os.path.exists(path) else None


def _stats(train_x: np.ndarray, files: list[str], given_mean, given_std) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the training images in [0, 1]: given, or computed and cached."""
    if given_mean is not None and given_std is not None:
        return tuple(given_mean), tuple(given_std)
    cache = cache_path().with_name(f"stats-{content_identity(files)}.json")
    try:
        saved = json.loads(cache.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    except (OSError, ValueError, KeyError):
        pass
    x = torch.from_numpy(train_x).double() / 255  # [N, C, H, W]
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    try:
        write_text_atomic(cache, json.dumps({"mean": mean, "std": std}))
    except (OSError, DiskError):
        pass  # a read-only home: recomputed next time
    return tuple(mean), tuple(std)


def _to_nchw(x: np.ndarray, layout: str, source: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and layout == "NHWC":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4 and layout == "NCHW":
        return x
    raise DataError(f"{source}: images must be [N, H, W] or [N, H, W, C] / [N, C, H, W] (data.layout), got "
                    f"{list(x.shape)}.")


def _bundle(arrays, files, source, num_classes, layout, mean, std, loading: Loading):
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"data.num_classes must be an integer >= 2, got {num_classes!r}.")
    check_arrays(source, *arrays, num_classes=num_classes)
    tx, ty, vx, vy = arrays
    tx, vx = _to_nchw(tx, layout, source), _to_nchw(vx, layout, source)
    tx, vx = np.array(tx, copy=True), np.array(vx, copy=True)  # idx arrays are read-only views of the file bytes
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(f"{source}: train images {list(tx.shape[1:])} and test images {list(vx.shape[1:])} differ.")
    stats = _stats(tx, files, mean, std)
    if len(stats[0]) != tx.shape[1] or len(stats[1]) != tx.shape[1]:
        raise DataError(f"data.mean / data.std need one value per channel ({tx.shape[1]}), got {stats}.")
    tensors = (torch.from_numpy(tx), torch.from_numpy(ty.astype(np.int64)), torch.from_numpy(vx),
               torch.from_numpy(vy.astype(np.int64)))
    return image_bundle(tensors, num_classes, loading, *stats)


def idx(root, folder, files, num_classes=10, mean=None, std=None, **loading):
    """Four idx files (images idx3 and labels idx1, train and test, optionally .gz) under root/folder.
    ``loading``: batch_size (64), test_batch_size (1000), limit_train, limit_test, augment, seed, device."""
    loading = Loading(**{"batch_size": 64, "test_batch_size": 1000, **loading})
    root = resolve_root(root)
    found, looked = _idx_paths(root, folder, files)
    if None in found:
        missing = [p for p, f in zip(looked, found) if f is None]
        raise DataError(f"data=idx: not found: {', '.join(m + '[.gz]' for m in missing)}. Set data.root, data.folder "
                        "and data.files.* to where the four idx files are.")
    arrays = [read_idx(found[0], 3), read_idx(found[1], 1), read_idx(found[2], 3), read_idx(found[3], 1)]
    return _bundle(arrays, found, os.path.join(root, folder or ""), num_classes, "NHWC", mean, std, loading)


def npz(root, file, num_classes, layout="NHWC", mean=None, std=None, **loading):
    """One .npz with train_x, train_y, test_x, test_y (uint8 images, integer labels).
    ``loading``: batch_size (128), test_batch_size (1000), limit_train, limit_test, augment, seed, device."""
    loading = Loading(**{"batch_size": 128, "test_batch_size": 1000, **loading})
    if layout not in ("NHWC", "NCHW"):
        raise DataError(f"data.layout must be NHWC or NCHW, got {layout!r}.")
    root = resolve_root(root)
    path = _npz_path(root, str(file))
    if not os.path.exists(path):
        raise DataError(f"data=npz: {path} not found. Set data.file (relative to data.root, or absolute) to an .npz "
                        "with train_x, train_y, test_x, test_y.")
    return _bundle(load_npz_arrays(path), [path], path, num_classes, layout, mean, std, loading)
