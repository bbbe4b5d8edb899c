"""Batches: the loader of in-memory datasets (MNIST, CIFAR, data=idx/npz, the teacher problem) and
how a batch is shared out between the ranks of a data-parallel run.

Images live in memory as uint8 tensors on the training device. A training epoch slices them by a
permutation and augments whole batches at once (random crop with zero padding + flip), then
converts uint8 -> normalised float in one step (the /255 folded into the constants). All
randomness of an epoch comes from a generator seeded by (seed, epoch), so the batches of epoch k
do not depend on what ran before: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.errors import ConfigError


@dataclass
class DataBundle:
    train: object  # iterable of (x, y) batches with set_epoch(epoch) and len()
    test: object
    num_classes: int  # 0 for regression
    input_shape: tuple
    task: str = "classification"  # or "regression" (squared loss, no accuracy)
    #: how the model's input is made from the images as the dataset stores them (uint8 [N, C, H, W]): the
    #: per-channel ``mean``/``std`` (of x / 255) and the ``rule`` the loader applies; None for float data
    preprocessing: dict | None = None


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
# Sharding a batch across the ranks of a data-parallel run (qtrain/parallel/)
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




@dataclass(frozen=True)
class Loading:
    """How a dataset's arrays become batches: the keys every config of configs/data/ shares."""

    batch_size: int
    test_batch_size: int
    limit_train: int | None = None
    limit_test: int | None = None
    augment: str | None = None
    seed: int = 0
    device: str | torch.device = "cpu"


def limit(x, y, n):
    return (x, y) if n is None else (x[:n], y[:n])


def image_bundle(arrays, num_classes: int, loading: Loading, mean, std) -> DataBundle:
    """Train and test loaders over uint8 image tensors [N, C, H, W], normalised with mean/std."""
    tx, ty, vx, vy = arrays
    tx, ty = limit(tx, ty, loading.limit_train)
    vx, vy = limit(vx, vy, loading.limit_test)
    train = TensorLoader(tx, ty, loading.batch_size, train=True, seed=loading.seed, augment=loading.augment,
                         mean=mean, std=std, device=loading.device)
    test = TensorLoader(vx, vy, loading.test_batch_size, train=False, mean=mean, std=std, device=loading.device)
    pre = {"input": "uint8", "layout": "NCHW", "mean": [float(m) for m in mean], "std": [float(s) for s in std],
           "rule": "shift_scale"}  # (x - 255 mean) * (1 / (255 std)), in float32 (TensorLoader)
    return DataBundle(train, test, num_classes, tuple(tx.shape[1:]), preprocessing=pre)
