"""Datasets and batch iterators.

MNIST and CIFAR live in memory as uint8 tensors on the training device. A training epoch slices
them by a permutation and augments whole batches at once (random crop with zero padding + flip),
then converts uint8 -> normalised float in one step (the /255 folded into the constants). All randomness of an epoch comes
from a generator seeded by (seed, epoch), so the batches of epoch k do not depend on what ran
before: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

from qtrain.errors import ConfigError, DataError

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


@dataclass
class DataBundle:
    train: object  # iterable of (x, y) batches with set_epoch(epoch) and len()
    test: object
    num_classes: int  # 0 for regression
    input_shape: tuple
    task: str = "classification"  # or "regression" (squared loss, no accuracy)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4):
    """Batched random crop of a zero-padded image plus horizontal flip.

    x: [B, C, H, W] (any dtype); dy, dx: crop offsets in [0, 2*pad]; flip: bool [B].
    Equivalent per sample to torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


class TensorLoader:
    """Batches from tensors that already sit on the device.

    uint8 images are normalised on the fly as (x - 255*mean) * (1 / (255*std)): the /255 is folded
    into the two constants. Float inputs (the teacher data) pass through unchanged.
    """

    def __init__(self, x, y, batch_size, *, train, seed=0, augment=None, mean=None, std=None, device="cpu"):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.seed, self.augment = int(batch_size), train, seed, augment
        self.device = torch.device(device)
        self.epoch, self.first_batch = 0, 0
        self.rank, self.world = 0, 1  # a data-parallel run's rank: see shard()
        if mean is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self.shift = (torch.tensor(mean) * 255).view(shape).to(device)
            self.scale = (1.0 / (torch.tensor(std) * 255)).view(shape).to(device)
        else:
            self.shift = None

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next pass yields epoch ``epoch``'s batches from ``first_batch`` on (a run resumed
        mid-epoch skips the batches it already trained on, without drawing them)."""
        self.epoch, self.first_batch = epoch, first_batch

    def shard(self, rank: int, world: int) -> None:
        """Yield only this rank's share (see :func:`rank_slice`); the batch size stays the global one."""
        check_shardable(len(self.x), self.batch_size, world, self.train)
        self.rank, self.world = rank, world

    def loss_weight(self, batch: int) -> float:
        return loss_weight(len(self.x), self.batch_size, self.rank, self.world, batch)

    def __len__(self):
        return batches_of(len(self.x), self.batch_size, self.rank, self.world, self.train)

    def _normalise(self, xb):
        if self.shift is None:
            return xb
        return (xb.float() - self.shift) * self.scale

    def __iter__(self):
        n = len(self.x)
        if not self.train:
            for i in range(self.rank * self.batch_size, n, self.world * self.batch_size):
                yield self._normalise(self.x[i:i + self.batch_size]), self.y[i:i + self.batch_size]
            return
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=g).to(self.device)
        if self.augment == "crop_flip":
            offsets = torch.randint(0, 9, (2, n), generator=g).to(self.device)
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        for i in range(self.first_batch * self.batch_size, n, self.batch_size):
            # positions i .. i + batch_size of the epoch's order (one rank: all of them)
            pos = slice(i, i + self.batch_size) if self.world == 1 else rank_slice(i, n, self.batch_size, self.rank,
                                                                                    self.world)
            idx = order[pos]
            xb = self.x[idx]
            if self.augment == "crop_flip":
                xb = crop_flip(xb, offsets[0, pos], offsets[1, pos], flips[pos])
            yield self._normalise(xb), self.y[idx]


# ---------------------------------------------------------------------------------------------
# Sharding a batch across the ranks of a data-parallel run (distributed.py)
# ---------------------------------------------------------------------------------------------


def rank_slice(start: int, n: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s part of the batch at positions start .. start + batch_size (of n): the batch
    split into ``world`` contiguous parts whose sizes differ by at most one (torch.tensor_split)."""
    size = min(batch_size, n - start)
    base, extra = divmod(size, world)
    lo = start + rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def loss_weight(n: int, batch_size: int, rank: int, world: int, batch: int) -> float:
    """Weight of this rank's mean loss on training batch ``batch``: DistributedDataParallel averages
    the ranks' gradients, which is the gradient of the whole batch's mean loss only when the parts
    are equal. The last batch may split unevenly; each rank's loss then counts by its size."""
    size = min(batch_size, n - batch * batch_size)
    if world == 1 or size == batch_size:
        return 1.0
    part = rank_slice(batch * batch_size, n, batch_size, rank, world)
    return (part.stop - part.start) * world / size


def batches_of(n: int, batch_size: int, rank: int, world: int, train: bool) -> int:
    """Batches per epoch: training, every rank steps through every batch; testing, rank r takes
    batches r, r + world, ... (whole batches: each is computed as one process would)."""
    total = -(-n // batch_size)
    return total if train or world == 1 else len(range(rank, total, world))


def check_shardable(n: int, batch_size: int, world: int, train: bool) -> None:
    if not train:
        return
    if batch_size % world:
        raise ConfigError(f"data.batch_size={batch_size} does not divide over devices={world}: the batch size is the "
                          f"global batch (each device takes batch_size / devices). Use a multiple of {world}.")
    last = n - (-(-n // batch_size) - 1) * batch_size
    if last < world:
        raise ConfigError(f"the last training batch has {last} sample(s), fewer than devices={world}, so a device would "
                          "get none. Change data.limit_train or data.batch_size.")


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _missing(name: str, looked: list[str], expected: str, how: str) -> DataError:
    places = ", ".join(looked)
    return DataError(
        f"{name} was not found (looked at {places}) and cannot be downloaded here. Expected {expected}. "
        f"{how} Point qtrain at the folder with data.root=/abs/path or the QTRAIN_DATA environment variable."
    )


IDX_DTYPE = 0x08  # unsigned byte: the only element type MNIST-style idx files use


def _read_idx(path: str, ndim: int) -> np.ndarray:
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


def _mnist_file(raw: str, stem: str) -> str | None:
    for cand in (os.path.join(raw, stem), os.path.join(raw, stem + ".gz")):
        if os.path.exists(cand):
            return cand
    return None


CIFAR_PICKLES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
                 "cifar100": ("cifar-100-python", ["train", "test"])}


def files_read(name: str, root: str, data_cfg=None):
    """The files the reader of dataset ``name`` would read under ``root`` (see dataset_id.py):
    a list of paths, a folder (ImageNet: identified by its listing), or None when they are not there."""
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
    if name in ("idx", "npz"):
        from qtrain import data_generic

        return data_generic.files_of(name, root, data_cfg)
    if name == "imagenet":
        base = os.path.join(root, "imagenet")
        return base if all(os.path.isdir(os.path.join(base, s)) for s in ("train", "val")) else None
    return None


@functools.lru_cache(maxsize=2)  # a sweep reads the same files once (the tensors are never modified)
def read_mnist(root: str):
    """(train_x, train_y, test_x, test_y) as tensors, from torchvision's layout <root>/MNIST/raw."""
    raw = os.path.join(root, "MNIST", "raw")
    find = functools.partial(_mnist_file, raw)
    stems = [s for pair in MNIST_FILES.values() for s in pair]
    if any(find(s) is None for s in stems):  # never download into (or create folders in) a data root
        raise _missing("MNIST", [raw], "the four files " + ", ".join(s + "[.gz]" for s in stems),
                       "On a machine with internet, `python -c \"import torchvision; "
                       "torchvision.datasets.MNIST('ROOT', download=True)\"` puts them there.")
    arrays = []
    for images, labels in MNIST_FILES.values():
        arrays += [_read_idx(find(images), 3), _read_idx(find(labels), 1)]
    check_arrays(f"MNIST in {raw}", *arrays, num_classes=10)
    tx, ty, vx, vy = arrays
    return (torch.from_numpy(tx.copy()).unsqueeze(1), torch.from_numpy(ty.astype(np.int64)),
            torch.from_numpy(vx.copy()).unsqueeze(1), torch.from_numpy(vy.astype(np.int64)))


@functools.lru_cache(maxsize=2)
def read_cifar(root: str, name: str):
    """CIFAR-10/100 from <root>/<name>.npz (see shared/data/README.md), else torchvision's files."""
    npz = os.path.join(root, f"{name}.npz")
    classes = {"cifar10": 10, "cifar100": 100}[name]
    if os.path.exists(npz):
        arrays = load_npz_arrays(npz)
        source = npz
    else:  # torchvision's extracted pickles, read without downloading (nothing is written into root)
        import torchvision

        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        try:
            tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
        except Exception:
            raise _missing(name.upper(), [npz, os.path.join(root, CIFAR_PICKLES[name][0])],
                           f"the array file {name}.npz (train_x uint8 [N,32,32,3], train_y, test_x, test_y) "
                           "or torchvision's extracted python pickles",
                           f"On a machine with internet, torchvision.datasets.{cls.__name__}('ROOT', download=True) "
                           "puts the pickles there.") from None
        arrays = [tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets)]
        source = os.path.join(root, CIFAR_PICKLES[name][0])
    check_arrays(source, *arrays, num_classes=classes, image_shape=(32, 32, 3))
    tx, ty, vx, vy = arrays
    to_chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return to_chw(tx), torch.from_numpy(ty.astype(np.int64)), to_chw(vx), torch.from_numpy(vy.astype(np.int64))


def _limit(x, y, limit):
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _resolve_root(root: str) -> str:
    return os.path.abspath(os.path.expanduser(str(root)))


def _image_bundle(name, arrays, num_classes, batch_size, test_batch_size, limit_train, limit_test,
                  augment, seed, device, stats=None):
    tx, ty, vx, vy = arrays
    tx, ty = _limit(tx, ty, limit_train)
    vx, vy = _limit(vx, vy, limit_test)
    mean, std = stats or STATS[name]
    train = TensorLoader(tx, ty, batch_size, train=True, seed=seed, augment=augment, mean=mean, std=std, device=device)
    test = TensorLoader(vx, vy, test_batch_size, train=False, mean=mean, std=std, device=device)
    return DataBundle(train, test, num_classes, tuple(tx.shape[1:]))


# ---------------------------------------------------------------------------------------------
# Dataset factories: the `_target_`s of configs/data/*.yaml
# ---------------------------------------------------------------------------------------------


def mnist(root, batch_size=64, test_batch_size=1000, limit_train=None, limit_test=None, augment=None,
          seed=0, device="cpu"):
    arrays = read_mnist(_resolve_root(root))
    return _image_bundle("mnist", arrays, 10, batch_size, test_batch_size, limit_train, limit_test, augment, seed, device)


def cifar10(root, batch_size=128, test_batch_size=1000, limit_train=None, limit_test=None, augment="crop_flip",
            seed=0, device="cpu"):
    arrays = read_cifar(_resolve_root(root), "cifar10")
    return _image_bundle("cifar10", arrays, 10, batch_size, test_batch_size, limit_train, limit_test, augment, seed, device)


def cifar100(root, batch_size=128, test_batch_size=1000, limit_train=None, limit_test=None, augment="crop_flip",
             seed=0, device="cpu"):
    arrays = read_cifar(_resolve_root(root), "cifar100")
    return _image_bundle("cifar100", arrays, 100, batch_size, test_batch_size, limit_train, limit_test, augment, seed,
                         device)


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


def teacher(m=20, n=50, n_train=1000, n_test=10000, batch_size=100, test_batch_size=1000, limit_train=None,
            limit_test=None, augment=None, seed=0, device="cpu", root=None):
    """Gaussian inputs Z in R^{m x n} with teacher labels y* = v*^T sigma(Z w*) (squared loss)."""
    w_star, v_star = teacher_problem(m, n, seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    tx = torch.randn(n_train if limit_train is None else limit_train, m, n, generator=g, dtype=torch.float64)
    vx = torch.randn(n_test if limit_test is None else limit_test, m, n, generator=g, dtype=torch.float64)
    ty, vy = teacher_outputs(tx, w_star, v_star), teacher_outputs(vx, w_star, v_star)
    f32 = lambda t: t.float()  # noqa: E731
    train = TensorLoader(f32(tx), f32(ty), batch_size, train=True, seed=seed, device=device)
    test = TensorLoader(f32(vx), f32(vy), test_batch_size, train=False, device=device)
    return DataBundle(train, test, 0, (m, n), task="regression")
