"""ImageNet (any ImageFolder tree of JPEG/PNG files): decoded by DataLoader workers, built once per run.

The DataLoader and its workers live for the whole run (``persistent_workers``), with pinned memory
and prefetching on CUDA. Like the in-memory loaders, everything random is a function of
(seed, epoch, sample): the sampler hands each worker (epoch, index) pairs, and the sample's own
augmentation (RandomResizedCrop, flip) is drawn from a generator seeded by them. So the batches of
an epoch do not depend on the number of workers, on which worker decoded what, or on what ran
before, and a run resumed mid-epoch skips exactly the batches it had trained on.

Decoding: PIL through torchvision's ImageFolder (the reference pipeline). `qtrain-bench --loader`
measures it on generated JPEG files beside a plain torchvision DataLoader.
"""

from __future__ import annotations

import os

import torch

from qtrain.data.builtin import STATS
from qtrain.data.loaders import DataBundle, batches_of, check_shardable, loss_weight, rank_slice
from qtrain.data.readers import missing_error, resolve_root


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 100_000_007 + index


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset whose transform draws from torch's RNG: item (epoch, index) is transformed
    under a generator seeded by (seed, epoch, index), leaving the caller's RNG state untouched."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        state = torch.get_rng_state()  # (torch.manual_seed would also seed CUDA: 0.3 ms a call)
        torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of the loader's current epoch, as lists of (epoch, index) pairs, in the
    (seed, epoch) order, from the first batch not yet trained on. Read when an epoch's iteration
    starts, so one DataLoader serves all epochs. In a data-parallel run each rank takes its slice of
    every training batch and every world-th test batch (data.rank_slice, as the in-memory loaders)."""

    def __init__(self, loader: "ImageLoader"):
        self.loader = loader

    def _batches(self):
        ld = self.loader
        first = ld.first_batch if ld.train else 0
        return [b for b in range(first, -(-len(ld.dataset) // ld.batch_size))
                if ld.train or b % ld.world == ld.rank]

    def __len__(self):
        return len(self._batches())

    def __iter__(self):
        ld = self.loader
        n = len(ld.dataset)
        if ld.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(ld.seed * 100_003 + ld.epoch))
        else:
            order = torch.arange(n)
        for b in self._batches():
            start = b * ld.batch_size
            part = rank_slice(start, n, ld.batch_size, ld.rank, ld.world) if ld.train else \
                slice(start, start + ld.batch_size)
            yield [(ld.epoch, i) for i in order[part].tolist()]


class ImageLoader:
    """Batches of an image dataset on ``device``: one DataLoader (and one set of workers) per run."""

    def __init__(self, dataset, batch_size, train, seed, workers, device, prefetch=4):
        self.dataset, self.batch_size, self.train, self.seed = dataset, int(batch_size), train, seed
        self.device, self.epoch, self.first_batch = torch.device(device), 0, 0
        self.rank, self.world = 0, 1  # a data-parallel run's rank: see shard()
        cuda = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(dataset, seed), batch_sampler=EpochBatches(self),
            num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda,
            prefetch_factor=prefetch if workers > 0 else None)
        self.channels_last = cuda  # conv nets on CUDA run channels_last (the config's default)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def shard(self, rank: int, world: int) -> None:
        check_shardable(len(self.dataset), self.batch_size, world, self.train)
        self.rank, self.world = rank, world

    def loss_weight(self, batch: int) -> float:
        return loss_weight(len(self.dataset), self.batch_size, self.rank, self.world, batch)

    def __len__(self):
        return batches_of(len(self.dataset), self.batch_size, self.rank, self.world, self.train)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def transforms(image_size: int, train: bool):
    """The standard ImageNet pipeline: RandomResizedCrop + flip (train), Resize + CenterCrop (val)."""
    import torchvision.transforms as T

    norm = T.Normalize(*STATS["imagenet"])
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])


def files_of(root: str) -> str | None:
    """The ImageFolder tree ``imagenet=`` reads (identified by its listing), or None if missing."""
    base = os.path.join(root, "imagenet")
    return base if all(os.path.isdir(os.path.join(base, s)) for s in ("train", "val")) else None


def imagenet(root, batch_size=256, test_batch_size=256, limit_train=None, limit_test=None, augment="standard",
             image_size=224, workers=8, seed=0, device="cpu"):
    """ImageNet as ImageFolders <root>/imagenet/{train,val}, with the standard augmentation."""
    from torchvision.datasets import ImageFolder

    base = os.path.join(resolve_root(root), "imagenet")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(base, split)):
            raise missing_error("ImageNet", [os.path.join(base, split)],
                           "ImageFolder layouts imagenet/train/<class>/*.JPEG and imagenet/val/<class>/*.JPEG",
                           "Prepare the validation split in per-class folders (e.g. with the usual valprep script).")
    train_set = ImageFolder(os.path.join(base, "train"), transforms(image_size, train=bool(augment)))
    test_set = ImageFolder(os.path.join(base, "val"), transforms(image_size, train=False))
    classes = len(train_set.classes)
    if limit_train is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(limit_train, len(train_set))))
    if limit_test is not None:
        test_set = torch.utils.data.Subset(test_set, range(min(limit_test, len(test_set))))
    mean, std = STATS["imagenet"]  # torchvision's ToTensor (x / 255) then Normalize, after Resize + CenterCrop
    pre = {"input": "uint8", "layout": "NCHW", "mean": list(mean), "std": list(std), "rule": "divide_normalize",
           "resize": int(image_size * 256 / 224), "crop": image_size}
    return DataBundle(ImageLoader(train_set, batch_size, True, seed, workers, device),
                      ImageLoader(test_set, test_batch_size, False, seed, workers, device),
                      classes, (3, image_size, image_size), preprocessing=pre)
