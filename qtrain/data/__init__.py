"""Datasets, mirroring configs/data/: each config's ``_target_`` is a factory exported here
(``qtrain.data.mnist``, ``qtrain.data.idx``, ...), which returns a :class:`~qtrain.data.loaders.DataBundle`.

    builtin.py      MNIST, CIFAR-10/100 (torchvision's files or shared/data's .npz), the teacher problem,
                    synthetic stand-ins (no file read)
    generic.py      data=idx and data=npz: any dataset in those formats, by config alone
    imagefolder.py  ImageNet (an ImageFolder tree): DataLoader workers, per-sample seeded augmentation
    loaders.py      the in-memory batch loader, and sharding a batch over the ranks of a data-parallel run
    readers.py      reading idx / .npz files safely; the "dataset not found" error
    identity.py     a dataset's identity by its files' content (cached hashes), part of a run's fingerprint

The imports point one way: this file -> the readers of each dataset -> loaders, readers, identity.
"""

from __future__ import annotations

from omegaconf import DictConfig

from qtrain.data import builtin, generic, imagefolder
from qtrain.data.builtin import cifar10, cifar100, mnist, synthetic, teacher
from qtrain.data.generic import idx, npz
from qtrain.data.identity import content_identity, imagenet_files
from qtrain.data.imagefolder import imagenet
from qtrain.data.readers import resolve_root
from qtrain.keys import short_name

__all__ = ["cifar10", "cifar100", "mnist", "synthetic", "teacher", "idx", "npz", "imagenet", "files_read", "dataset_identity"]


def files_read(name: str, root: str, data_cfg=None):
    """The files the reader of dataset ``name`` would read under ``root``: a list of paths, a folder
    (ImageNet: identified by its listing), or None when they are not there (or the data is generated)."""
    if name in ("idx", "npz"):
        return generic.files_of(name, root, data_cfg)
    if name == "imagenet":
        return imagefolder.files_of(root)
    return builtin.files_of(name, root)


def dataset_identity(data_cfg: DictConfig) -> str | None:
    """The identity of the dataset ``data_cfg`` reads, or None when its files are not there (the
    run then stops at the data step with its own message) or the data is generated (teacher:
    its parameters are in the config already)."""
    root = data_cfg.get("root")
    if root is None:
        return None
    root = resolve_root(root)
    files = files_read(short_name(data_cfg), root, data_cfg)
    if files is None:
        return None
    if isinstance(files, str):  # a folder identified by its listing
        return imagenet_files(files)
    return content_identity(files)
