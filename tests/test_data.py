"""The fast data path: batched crop/flip equals the per-sample torchvision reference; epochs are
seeded; normalisation is the usual one; the MNIST reader gives the real dataset."""

import torch
import torchvision.transforms.v2.functional as TF

import qtrain.data.loaders
from qtrain.data import mnist
from qtrain.data.builtin import STATS
from qtrain.data.loaders import TensorLoader, crop_flip


def test_crop_flip_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (2, 16), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    ours = crop_flip(x, dy, dx, flip)
    for i in range(16):
        ref = TF.crop(TF.pad(x[i], [4, 4, 4, 4], fill=0), int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(ours[i], ref), i


def test_loader_draws_uniform_crops_and_fair_flips(monkeypatch):
    seen = []

    def recording_crop_flip(x, dy, dx, flip, pad=4):
        seen.append((dy, dx, flip))
        return crop_flip(x, dy, dx, flip, pad)

    monkeypatch.setattr(qtrain.data.loaders, "crop_flip", recording_crop_flip)
    x = torch.zeros(9000, 1, 8, 8, dtype=torch.uint8)
    loader = TensorLoader(x, torch.zeros(9000, dtype=torch.long), 1000, train=True, augment="crop_flip")
    batches = list(loader)
    assert len(batches) == 9 and len(seen) == 9
    offsets = torch.cat([torch.cat([dy, dx]) for dy, dx, _ in seen])
    counts = torch.bincount(offsets, minlength=9).float()
    assert counts.numel() == 9 and counts.min() > 0.85 * counts.mean()  # each of 0..8 about 1/9
    flips = torch.cat([f for _, _, f in seen]).float().mean()
    assert 0.47 < float(flips) < 0.53


def test_epochs_are_seeded_and_cover_every_sample():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 4, 4).contiguous()
    y = torch.arange(100)
    a = TensorLoader(x, y, 32, train=True, seed=3)
    b = TensorLoader(x, y, 32, train=True, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    ya = torch.cat([yb for _, yb in a])
    assert torch.equal(ya, torch.cat([yb for _, yb in b]))
    assert sorted(ya.tolist()) == list(range(100))
    a.set_epoch(6)
    assert not torch.equal(ya, torch.cat([yb for _, yb in a]))


def test_fused_normalisation():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mean, std = STATS["cifar10"]
    loader = TensorLoader(x, torch.zeros(8, dtype=torch.long), 8, train=False, mean=mean, std=std)
    (xb, _), = list(loader)
    ref = TF.normalize(x.float() / 255, list(mean), list(std))
    assert torch.allclose(xb, ref, atol=1e-5)


def test_real_mnist(mnist_root):
    bundle = mnist(mnist_root)
    assert len(bundle.train.x) == 60000 and len(bundle.test.x) == 10000
    assert bundle.train.x.dtype == torch.uint8 and tuple(bundle.input_shape) == (1, 28, 28)
    assert torch.bincount(bundle.test.y).tolist()[:2] == [980, 1135]  # the well-known test class counts


def test_imagenet_loader_is_a_function_of_seed_and_epoch(fake_imagenet_root):
    """Same batches whatever the number of workers, different per epoch, and a mid-epoch start
    yields exactly the rest of the epoch (resume)."""
    from qtrain.data.imagefolder import imagenet

    def epoch(workers, e, first=0):
        bundle = imagenet(fake_imagenet_root, batch_size=2, image_size=32, workers=workers, seed=3)
        bundle.train.set_epoch(e, first)
        return [(x.clone(), y.clone()) for x, y in bundle.train]

    a, b = epoch(0, 1), epoch(2, 1)
    assert len(a) == 3 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], epoch(0, 2)[0][0])  # another epoch: other order and crops
    tail = epoch(2, 1, first=1)
    assert len(tail) == 2 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[1:], tail))
