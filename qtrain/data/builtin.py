"""The built-in datasets: MNIST and CIFAR-10/100 from the files torchvision (or shared/data) lays
out, and the [CG] teacher problem generated from its seed. Each factory is the ``_target_`` of its
config in configs/data/ (as ``qtrain.data.<name>``). Nothing is ever written into a data root."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from qtrain.data.download import fetch
from qtrain.data.loaders import DataBundle, Loading, TensorLoader, image_bundle
from qtrain.data.readers import check_arrays, load_npz_arrays, missing_error, read_idx, resolve_root
from qtrain.errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    # The [STE] authors' CIFAR code uses these (SPEC §4).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _mnist_file(raw: str, stem: str) -> str | None:
    for cand in (os.path.join(raw, stem), os.path.join(raw, stem + ".gz")):
        if os.path.exists(cand):
            return cand
    return None


CIFAR_PICKLES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
                 "cifar100": ("cifar-100-python", ["train", "test"])}


def files_of(name: str, root: str) -> list[str] | None:
    """The files the reader of built-in dataset ``name`` reads under ``root`` (for the dataset's
    identity), or None when they are not there."""
    if name == "mnist":
        found = [_mnist_file(os.path.join(root, "MNIST", "raw"), s) for pair in MNIST_FILES.values() for s in pair]
        return None if None in found else found
    if name in CIFAR_PICKLES:
        npz = os.path.join(root, f"{name}.npz")
        if os.path.exists(npz):
            return [npz]
        folder, parts = CIFAR_PICKLES[name]
        found = [os.path.join(root, folder, p) for p in parts]
        return found if all(os.path.exists(f) for f in found) else None
    return None


def _fetched(name: str, root: str, download: bool, source) -> str | None:
    """None when ``data.download`` put the dataset into ``root`` now, else what to say about it."""
    if not download:
        return "is not downloaded (data.download=false)"
    why = fetch(name, root, source)
    return None if why is None else f"was not downloaded: {why}"


@functools.lru_cache(maxsize=2)  # a sweep reads the same files once (the tensors are never modified)
def read_mnist(root: str, download: bool = False, mirrors: tuple | None = None):
    """(train_x, train_y, test_x, test_y) as tensors, from torchvision's layout <root>/MNIST/raw;
    ``download``: fetched there first when missing (qtrain.data.download)."""
    raw = os.path.join(root, "MNIST", "raw")
    find = functools.partial(_mnist_file, raw)
    stems = [s for pair in MNIST_FILES.values() for s in pair]
    if any(find(s) is None for s in stems):
        why = _fetched("mnist", root, download, mirrors)
        if why is not None:
            raise missing_error("MNIST", [raw], "the four files " + ", ".join(s + "[.gz]" for s in stems),
                                "On a machine with internet, `python -c \"import torchvision; "
                                "torchvision.datasets.MNIST('ROOT', download=True)\"` puts them there.", why)
    arrays = []
    for images, labels in MNIST_FILES.values():
        arrays += [read_idx(find(images), 3), read_idx(find(labels), 1)]
    check_arrays(f"MNIST in {raw}", *arrays, num_classes=10)
    tx, ty, vx, vy = arrays
    return (torch.from_numpy(tx.copy()).unsqueeze(1), torch.from_numpy(ty.astype(np.int64)),
            torch.from_numpy(vx.copy()).unsqueeze(1), torch.from_numpy(vy.astype(np.int64)))


@functools.lru_cache(maxsize=2)
def read_cifar(root: str, name: str, download: bool = False, url: str | None = None):
    """CIFAR-10/100 from <root>/<name>.npz (see shared/data/README.md), else torchvision's files;
    ``download``: those fetched there first when neither is there (qtrain.data.download)."""
    npz = os.path.join(root, f"{name}.npz")
    classes = {"cifar10": 10, "cifar100": 100}[name]
    why = None
    if not os.path.exists(npz) and files_of(name, root) is None:
        why = _fetched(name, root, download, url)
    if os.path.exists(npz):
        arrays = load_npz_arrays(npz)
        source = npz
    else:  # torchvision's extracted pickles, read without downloading (qtrain.data.download fetched them)
        import torchvision

        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        try:
            tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
        except Exception:
            raise missing_error(name.upper(), [npz, os.path.join(root, CIFAR_PICKLES[name][0])],
                           f"the array file {name}.npz (train_x uint8 [N,32,32,3], train_y, test_x, test_y) "
                           "or torchvision's extracted python pickles",
                           f"On a machine with internet, torchvision.datasets.{cls.__name__}('ROOT', download=True) "
                           "puts the pickles there.", why or "cannot be read") from None
        arrays = [tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets)]
        source = os.path.join(root, CIFAR_PICKLES[name][0])
    check_arrays(source, *arrays, num_classes=classes, image_shape=(32, 32, 3))
    tx, ty, vx, vy = arrays
    to_chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return to_chw(tx), torch.from_numpy(ty.astype(np.int64)), to_chw(vx), torch.from_numpy(vy.astype(np.int64))



def mnist(root, batch_size=64, test_batch_size=1000, limit_train=None, limit_test=None, augment=None,
          seed=0, device="cpu", download=False, mirrors=None):
    """``download``: fetch the files into ``root`` when missing; ``mirrors``: base URLs (torchvision's)."""
    loading = Loading(batch_size, test_batch_size, limit_train, limit_test, augment, seed, device)
    arrays = read_mnist(resolve_root(root), bool(download), tuple(mirrors) if mirrors else None)
    return image_bundle(arrays, 10, loading, *STATS["mnist"])


def cifar10(root, batch_size=128, test_batch_size=1000, limit_train=None, limit_test=None, augment="crop_flip",
            seed=0, device="cpu", download=False, url=None):
    """``download``: fetch torchvision's files into ``root`` when missing; ``url``: the archive (torchvision's)."""
    loading = Loading(batch_size, test_batch_size, limit_train, limit_test, augment, seed, device)
    arrays = read_cifar(resolve_root(root), "cifar10", bool(download), url)
    return image_bundle(arrays, 10, loading, *STATS["cifar10"])


def cifar100(root, batch_size=128, test_batch_size=1000, limit_train=None, limit_test=None, augment="crop_flip",
             seed=0, device="cpu", download=False, url=None):
    loading = Loading(batch_size, test_batch_size, limit_train, limit_test, augment, seed, device)
    arrays = read_cifar(resolve_root(root), "cifar100", bool(download), url)
    return image_bundle(arrays, 100, loading, *STATS["cifar100"])


def teacher_problem(m: int, n: int, seed: int):
    """The teacher of SPEC §5: w* on the unit sphere and v*, drawn from the seed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w_star = torch.randn(n, generator=g, dtype=torch.float64)
    w_star /= w_star.norm()
    v_star = torch.randn(m, generator=g, dtype=torch.float64)
    return w_star, v_star


def teacher_outputs(z: torch.Tensor, w_star: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """y* = v*^T sigma(Z w*) with sigma(x) = 1{x > 0}; z: [N, m, n]."""
    return ((z @ w_star) > 0).to(z.dtype) @ v_star


def teacher(m=20, n=50, n_train=1000, n_test=10000, root=None, **loading):
    """Gaussian inputs Z in R^{m x n} with teacher labels y* = v*^T sigma(Z w*) (squared loss).
    ``loading``: batch_size (100), test_batch_size (1000), limit_train, limit_test, seed, device."""
    lo = Loading(**{"batch_size": 100, "test_batch_size": 1000, **loading})
    w_star, v_star = teacher_problem(m, n, lo.seed)
    g = torch.Generator().manual_seed(20_000 + lo.seed)
    tx = torch.randn(n_train if lo.limit_train is None else lo.limit_train, m, n, generator=g, dtype=torch.float64)
    vx = torch.randn(n_test if lo.limit_test is None else lo.limit_test, m, n, generator=g, dtype=torch.float64)
    ty, vy = teacher_outputs(tx, w_star, v_star), teacher_outputs(vx, w_star, v_star)
    f32 = lambda t: t.float()  # noqa: E731
    train = TensorLoader(f32(tx), f32(ty), lo.batch_size, train=True, seed=lo.seed, device=lo.device)
    test = TensorLoader(f32(vx), f32(vy), lo.test_batch_size, train=False, device=lo.device)
    return DataBundle(train, test, 0, (m, n), task="regression")


#: input shape and classes of each built-in dataset (what a synthetic stand-in imitates)
SHAPES = {"mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
          "imagenet": ((3, 224, 224), 1000)}


def synthetic(like="cifar10", n_train=512, n_test=256, root=None, **loading):
    """Random uint8 images with the shape, classes and normalisation of dataset ``like``, drawn from the
    seed: no file is read. For timing a training step (qtrain-bench) or a smoke run without the data
    (``qtrain data=synthetic data.like=mnist model=lenet5``); its accuracy means nothing.
    ``loading``: batch_size (128), test_batch_size (1000), limit_train, limit_test, augment, seed, device."""
    if like not in SHAPES:
        raise DataError(f"data.like={like!r}: a synthetic stand-in imitates one of {', '.join(SHAPES)}.")
    lo = Loading(**{"batch_size": 128, "test_batch_size": 1000, **loading})
    shape, classes = SHAPES[like]
    g = torch.Generator().manual_seed(30_000 + lo.seed)
    arrays = (torch.randint(0, 256, (n_train, *shape), generator=g, dtype=torch.uint8),
              torch.randint(0, classes, (n_train,), generator=g),
              torch.randint(0, 256, (n_test, *shape), generator=g, dtype=torch.uint8),
              torch.randint(0, classes, (n_test,), generator=g))
    return image_bundle(arrays, classes, lo, *STATS[like])
