"""`qtrain-bench --ddp`: step time of a data-parallel run on the CPU (Gloo) against one process.

Each configuration is a real `qtrain` command (LeNet-5/MNIST, float weights, 2-bit activations,
global batch 64, a subset of MNIST), timed by its own per-epoch ``train/images_per_s`` (the first
epoch, with its warm-up, is left out); configurations are interleaved over rounds and the median is
reported. The plain-PyTorch floor is DistributedDataParallel around the same LeNet-5 in a minimal
loop (two processes, one thread each): what data parallelism costs here before qtrain adds anything.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qtrain.data import mnist
from qtrain.models.lenet import LeNet5
from qtrain.quant.act import ActLayer

COMMON = ["data.limit_train=6400", "data.limit_test=1000", "epochs=3", "progress=false"]
CONFIGS = {  # name: (extra overrides, OMP threads per process)
    "qtrain devices=1, 1 thread": (["devices=1"], 1),
    "qtrain devices=1, 2 threads": (["devices=1"], 2),
    "qtrain devices=2, 1 thread each": (["devices=2"], 1),
}


def _qtrain_images_per_s(extra, threads, root, out) -> float:
    exe = Path(sys.executable).parent / "qtrain"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QTRAIN_DATA": root}
    r = subprocess.run([str(exe), *COMMON, *extra, f"out_dir={out}"], env=env, capture_output=True, text=True,
                       timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    (metrics,) = Path(out).glob("runs/*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return statistics.median(row["train/images_per_s"] for row in rows[1:])


def _plain_worker(rank, world, port, root, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    data = mnist(root, batch_size=64, limit_train=6400)
    x, y = next(iter(data.train))
    x, y = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
    model = torch.nn.parallel.DistributedDataParallel(LeNet5(10, (1, 28, 28), ActLayer(bits=2, alpha=1.0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(10):
        step()
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.distributed.barrier()
    if rank == 0:
        Path(out).write_text(str(64 * steps / (time.perf_counter() - start)))
    torch.distributed.destroy_process_group()


def _plain_images_per_s(root, steps=200) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rate"
        torch.multiprocessing.start_processes(_plain_worker, args=(2, port, root, steps, str(out)), nprocs=2,
                                              start_method="spawn")
        return float(out.read_text())


def run(root: str, rounds: int = 3) -> dict:
    rates = {name: [] for name in [*CONFIGS, "plain PyTorch DDP, 2 processes x 1 thread"]}
    for _ in range(rounds):
        for name, (extra, threads) in CONFIGS.items():
            with tempfile.TemporaryDirectory() as out:
                rates[name].append(_qtrain_images_per_s(extra, threads, root, out))
        rates["plain PyTorch DDP, 2 processes x 1 thread"].append(_plain_images_per_s(root))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["qtrain devices=1, 2 threads"]
    return {"images_per_s": med, "step_ms": {k: 64 / v * 1000 for k, v in med.items()},
            "ratio_vs_devices1_2threads": {k: v / base for k, v in med.items()}, "rounds": rounds,
            "all": rates, "torch": torch.__version__, "cpus": os.cpu_count()}


def format_table(result: dict) -> str:
    lines = ["| configuration | images/s | step (ms, batch 64) | speed vs devices=1 (2 threads) |", "|---|---|---|---|"]
    for k, v in result["images_per_s"].items():
        lines.append(f"| {k} | {v:.0f} | {result['step_ms'][k]:.1f} | {result['ratio_vs_devices1_2threads'][k]:.2f}x |")
    return "\n".join(lines)
