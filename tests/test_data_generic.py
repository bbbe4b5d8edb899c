"""data=idx and data=npz: any dataset in a format qtrain reads, by config alone."""

import json
import struct

import numpy as np
import pytest

from qtrain.run.runner import train_run


def idx_bytes(arr):
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


@pytest.fixture
def fashion_root(tmp_path):
    """A small Fashion-MNIST look-alike: 5 classes, 28x28 gray, idx files (one gzipped) in a folder."""
    import gzip

    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 200), ("t10k", 50)):
        y = rng.integers(0, 5, n).astype(np.uint8)
        x = (rng.integers(0, 20, (n, 28, 28)) + 50 * y[:, None, None]).astype(np.uint8)  # learnable
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
    return tmp_path / "data"


def test_idx_dataset_trains_from_config_alone(make_cfg, fashion_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = sorted(p.name for p in fashion_root.rglob("*"))
    cfg = make_cfg("data=idx", f"data.root={fashion_root}", "data.folder=FashionMNIST/raw", "data.num_classes=5",
                   "epochs=3", "model=lenet5", "abits=2")
    result = train_run(cfg, tmp_path / "run")
    assert result["status"] == "complete" and result["final_train_acc"] > 50  # learnt: chance is 20 %
    assert sorted(p.name for p in fashion_root.rglob("*")) == before  # nothing written into the data root
    (stats,) = (tmp_path / "cache" / "qtrain").glob("stats-*.json")
    mean = json.loads(stats.read_text())["mean"]
    assert len(mean) == 1 and 0 < mean[0] < 1


@pytest.mark.parametrize("layout,shape", [("NHWC", (32, 32, 3)), ("NCHW", (3, 32, 32)), ("NHWC", (32, 32))])
def test_npz_dataset_trains_from_config_alone(make_cfg, tmp_path, monkeypatch, layout, shape):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 96), ("test", 32)):
        arrays[f"{split}_x"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_y"] = rng.integers(0, 3, n)
    np.savez(tmp_path / "svhn_like.npz", **arrays)
    cfg = make_cfg("data=npz", f"data.root={tmp_path}", "data.file=svhn_like.npz", "data.num_classes=3",
                   f"data.layout={layout}", "data.augment=crop_flip", "epochs=1", "model=resnet20", "data.batch_size=32",
                   "data.mean=[0.5,0.5,0.5]" if len(shape) == 3 else "data.mean=null",
                   "data.std=[0.25,0.25,0.25]" if len(shape) == 3 else "data.std=null")
    result = train_run(cfg, tmp_path / "run")
    assert result["status"] == "complete"
    assert result["config"]["data"]["num_classes"] == 3
