"""`qtrain-bench --loader`: images/s of qtrain's ImageNet input pipeline beside a plain torchvision
DataLoader, per worker count, on a generated ImageFolder of real JPEG files.

The files are made by the benchmark (ImageNet-like sizes around 500x375, smooth random content so
they compress like photographs, quality 90) in a temporary folder. Both pipelines decode with PIL
and apply the same training transforms (RandomResizedCrop 224 + flip + normalise); qtrain's adds its
per-sample seeding and persistent workers. Each configuration is timed over whole passes after a
warm-up pass, interleaved over rounds; the median is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qtrain.data.imagefolder import ImageLoader, transforms

#: what a training GPU consumes, for the comparison line: ResNet-18 on an H100 (an estimate, to be
#: replaced by a measurement when a GPU is available)
GPU_NEED_IMAGES_PER_S = 3000


def make_jpeg_folder(root: Path, n: int = 1000, classes: int = 10, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            d = root / "imagenet" / split / f"n{i % classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
            w, h = int(w * rng.uniform(0.8, 1.2)), int(h * rng.uniform(0.8, 1.2))
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(d / f"{i:06d}.JPEG", quality=90)
    return root


def _pass(loader) -> tuple[int, float]:
    t, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n, time.perf_counter() - t


def bench_loaders(workers_list=(0, 1, 2), n: int = 1000, batch_size: int = 64, rounds: int = 2,
                  image_size: int = 224) -> list[dict]:
    from torchvision.datasets import ImageFolder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp), n)
        train_dir = root / "imagenet" / "train"
        for workers in workers_list:
            ours = ImageLoader(ImageFolder(train_dir, transforms(image_size, True)), batch_size, True, 0, workers,
                               "cpu")
            reference = torch.utils.data.DataLoader(ImageFolder(train_dir, transforms(image_size, True)),
                                                    batch_size=batch_size, shuffle=True, num_workers=workers)
            pipelines = {"qtrain": ours, "torchvision": reference}
            times = {k: [] for k in pipelines}
            for name, loader in pipelines.items():  # warm-up: start workers, fill the page cache
                if name == "qtrain":
                    loader.set_epoch(0)
                _pass(loader)
            for r in range(rounds):
                for name, loader in pipelines.items():
                    if name == "qtrain":
                        loader.set_epoch(r + 1)
                    count, seconds = _pass(loader)
                    times[name].append(count / seconds)
            row = {"workers": workers, **{f"{k}_images_per_s": statistics.median(v) for k, v in times.items()}}
            row["ratio"] = row["qtrain_images_per_s"] / row["torchvision_images_per_s"]
            rows.append(row)
            del ours, reference
    return rows


def print_table(rows: list[dict]) -> None:
    print("| workers | qtrain img/s | torchvision img/s | qtrain / torchvision |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['qtrain_images_per_s']:,.0f} | {r['torchvision_images_per_s']:,.0f} | "
              f"{r['ratio']:.2f} |")
    with_workers = [r for r in rows if r["workers"] > 0] or rows
    per_worker = max(r["qtrain_images_per_s"] / max(r["workers"], 1) for r in with_workers)
    print(f"an 8-GPU node needs ~{8 * GPU_NEED_IMAGES_PER_S:,} img/s (estimate: {GPU_NEED_IMAGES_PER_S:,} per GPU for "
          f"ResNet-18 on an H100): at {per_worker:,.0f} img/s per worker here, about "
          f"{8 * GPU_NEED_IMAGES_PER_S / per_worker:,.0f} decoding workers (CPU cores) of this machine's speed")
