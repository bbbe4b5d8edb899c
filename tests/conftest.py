"""Shared fixtures: compose the real config (as Hydra would) and point it at small data."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "configs")
SHARED_DATA = ROOT.parent / "shared" / "data"


def real_data_root():
    """The verified offline datasets: $QTRAIN_DATA, else ../shared/data; None when absent."""
    for cand in (os.environ.get("QTRAIN_DATA"), SHARED_DATA):
        if cand and (Path(cand) / "MNIST" / "raw").is_dir():
            return str(Path(cand).resolve())
    return None


@pytest.fixture
def load_script():
    """load_script(name) -> scripts/<name>.py as a module (scripts/ is not a package), to test its functions."""

    def _load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return _load


@pytest.fixture
def mnist_root():
    root = real_data_root()
    if root is None:
        pytest.skip("no MNIST here: set QTRAIN_DATA to a folder with MNIST/raw (see shared/data/README.md)")
    return root


@pytest.fixture
def fake_cifar_root(tmp_path):
    """cifar10.npz / cifar100.npz stand-ins in the documented array format (64 + 32 images)."""
    rng = np.random.default_rng(0)
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        np.savez(tmp_path / f"{name}.npz",
                 train_x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                 train_y=rng.integers(0, classes, 64), test_x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
                 test_y=rng.integers(0, classes, 32))
    return str(tmp_path)


@pytest.fixture
def fake_imagenet_root(tmp_path):
    """A tiny ImageFolder tree <root>/imagenet/{train,val}/<class>/*.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            d = tmp_path / "imagenet" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(tmp_path)


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) -> the job config, with outputs under tmp_path and progress off."""

    def _make(*overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        with open_dict(cfg):
            cfg.out_dir = str(tmp_path / "outputs")
            cfg.progress = False
            cfg.device = "cpu"
        return cfg

    return _make
