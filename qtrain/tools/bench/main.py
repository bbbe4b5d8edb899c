"""`qtrain-bench`: what quantized training costs relative to float training, measured in one process.

    qtrain-bench --model resnet20 --data cifar10 --batch-size 128 --device cpu --json bench.json

Each variant is built from the real config (the same code path as `qtrain`) and its training step
(method hooks, forward, backward, optimizer step: train.train_one_epoch over a fixed batch) is
timed after warm-up. Variants are interleaved, round after round, so machine noise hits them all
alike; the table gives the median step time over rounds and the ratio to float measured in the
same run. The real data pipeline (load + augment + normalise, one epoch) is timed separately,
beside a torchvision DataLoader baseline with per-sample transforms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from qtrain.data.builtin import SHAPES, mnist
from qtrain.errors import QtrainError
from qtrain.keys import CONFIG_DIR
from qtrain.quant.act import IMPLS
from qtrain.run.build import build, instantiate_node
from qtrain.tools.bench import ddp, loader, memory
from qtrain.tools.bench.floor import plain_step
from qtrain.train.loop import Training, train_one_epoch

VARIANTS = {  # "{a}" is replaced by --abits
    "float": ["abits=null", "wbits=null", "method=float"],
    "a{a} (float weights)": ["abits={a}", "wbits=null", "method=float"],
    "w1a{a} ste": ["abits={a}", "wbits=1", "method=ste"],
    "w1a{a} binaryrelax": ["abits={a}", "wbits=1", "method=binaryrelax"],
    "w1a{a} bcgd": ["abits={a}", "wbits=1", "method=bcgd"],
    "w1a{a} bcgd learned-alpha": ["abits={a}", "wbits=1", "method=bcgd", "act.learn_alpha=true"],
}


def variants(abits: int) -> dict[str, list[str]]:
    return {k.format(a=abits): [o.format(a=abits) for o in v] for k, v in VARIANTS.items()}


class RepeatBatch:
    """A loader that yields the same device-resident batch ``steps`` times."""

    def __init__(self, x, y, steps):
        self.x, self.y, self.steps = x, y, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_cfg(args, overrides, real_data: bool):
    """The variant's config. The step timing needs one batch of the dataset's shape, not its files:
    ``real_data`` False gives it a synthetic stand-in (data=synthetic), so the dataset is read only
    when the data pipeline is timed (bench_data, --full-epoch)."""
    data = args.data if real_data or args.data not in SHAPES else "synthetic"
    like = [f"data.like={args.data}"] if data == "synthetic" else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={args.model}", f"data={data}", *like,
                                                        f"data.batch_size={args.batch_size}", *overrides])
    with open_dict(cfg):
        cfg.device, cfg.progress = args.device, False
        cfg.precision, cfg.compile, cfg.channels_last = args.precision, args.compile, args.channels_last
        if args.data_root and data != "synthetic":
            cfg.data.root = args.data_root
        # the step timing needs one batch; --full-epoch times whole epochs of the real data
        cfg.data.limit_train = None if args.full_epoch else args.batch_size
        cfg.data.limit_test = args.batch_size
    return cfg


def build_variant(args, overrides, device, batch_only=False):
    cfg = make_cfg(args, overrides, real_data=args.full_epoch)
    built = build(cfg, device)
    x, y = next(iter(built.data.train))
    if batch_only:
        return x, y
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    t = Training(torch.compile(built.model) if cfg.compile else built.model, built.method, built.optimizer,
                 built.task, device, amp_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    if args.full_epoch:  # one "step" = one epoch of the real loader (load + augment + train)
        return (lambda steps: [train_one_epoch(t, built.data.train) for _ in range(steps)]), len(built.data.train.x)
    return (lambda steps: train_one_epoch(t, RepeatBatch(x, y, steps))), args.batch_size


def time_steps(step, steps, device):
    sync(device)
    t = time.perf_counter()
    step(steps)
    sync(device)
    return (time.perf_counter() - t) / steps


FLOOR = "plain PyTorch ResNet-20 float"


def variant_rows(abits: int, names, impls):
    """(variant, act.impl, overrides): each chosen variant under each of ``impls`` (the float one once, under
    the first: it has no quantized activation)."""
    for name, overrides in variants(abits).items():
        if name in names:
            for impl in impls[:1] if name == "float" else impls:
                yield name, impl, overrides + [f"act.impl={impl}"]


def bench_steps(args, device):
    steppers = {}
    for name, impl, overrides in variant_rows(args.abits, args.variants, args.impls):
        # with several impls, the rows of those other than reference say theirs: "a4 [fused]"
        label = name if len(args.impls) == 1 or impl == "reference" else f"{name} [{impl}]"
        steppers[label] = build_variant(args, overrides, device)
    if args.model == "resnet20" and not args.full_epoch:  # the floor: same batch, none of qtrain's code
        x, y = build_variant(args, VARIANTS["float"], device, batch_only=True)
        steppers[FLOOR] = (plain_step(x, y, device), args.batch_size)
    images = {name: n for name, (_, n) in steppers.items()}  # per step (or per epoch with --full-epoch)
    steppers = {name: fn for name, (fn, _) in steppers.items()}
    for step in steppers.values():  # warm-up (and compilation)
        step(args.warmup)
    times = {name: [] for name in steppers}
    peaks = {name: 0 for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(time_steps(step, args.steps, device))
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    base = statistics.median(times["float"]) if "float" in times else None
    floor = statistics.median(times[FLOOR]) if FLOOR in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_step_ms": 1e3 * med, "min_step_ms": 1e3 * min(ts),
                     "images_per_s": images[name] / med, "ratio_to_float": med / base if base else None,
                     "ratio_to_plain": med / floor if floor else None,
                     "peak_mem_mib": peaks[name] / 2**20 if device.type == "cuda" else None})
    return rows


def bench_data(args, device):
    """One epoch of the real training pipeline, and a torchvision DataLoader baseline."""
    cfg = make_cfg(args, [], real_data=True)
    with open_dict(cfg):
        cfg.data.limit_train = cfg.data.limit_test = None
    data = instantiate_node(cfg.data, seed=0, device=device)  # a missing dataset: DataError, one paragraph
    loader = data.train
    loader.set_epoch(0)
    sync(device)
    t = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += len(x)
    sync(device)
    ours = time.perf_counter() - t
    out = {"images": n, "qtrain_epoch_s": ours, "qtrain_images_per_s": n / ours}
    if hasattr(loader, "x") and loader.x.dim() == 4:
        out.update(torchvision_baseline(loader, args, device))
    return out


def torchvision_baseline(loader, args, device, batches=50):
    """Per-sample PIL-free tensor transforms in a DataLoader (the usual recipe), timed on a few batches."""
    import torchvision.transforms.v2 as T

    mean, std = loader.shift.flatten() / 255, 1 / (loader.scale.flatten() * 255)
    steps = [T.RandomCrop(loader.x.shape[-1], padding=4), T.RandomHorizontalFlip()] if loader.augment else []
    tf = T.Compose([*steps, T.ToDtype(torch.float32, scale=True), T.Normalize(mean.tolist(), std.tolist())])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(loader.x)

        def __getitem__(self, i):
            return tf(loader.x[i].cpu()), loader.y[i].cpu()

    dl = torch.utils.data.DataLoader(DS(), batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    t, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(dl):
        x = x.to(device)
        n += len(x)
        if i + 1 == batches:
            break
    sync(device)
    rate = n / (time.perf_counter() - t)
    return {"torchvision_images_per_s": rate, "torchvision_workers": args.workers,
            "torchvision_epoch_s_extrapolated": len(loader.x) / rate}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-root", default=None, help="default: $QTRAIN_DATA")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--abits", type=int, default=4, help="activation bits of the quantized variants")
    p.add_argument("--variants", nargs="*", help="subset of the variant names (default: all)")
    p.add_argument("--impls", nargs="+", default=["fused"], choices=IMPLS,
                   help="act.impl of the quantized variants, a row each (default: fused, qtrain's default; "
                        "the tables measured before part 12 used reference)")
    p.add_argument("--full-epoch", action="store_true",
                   help="time whole epochs of the real data (pipeline included) instead of steps")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (qtrain's default; --no-channels-last for NCHW)")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline timing")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision baseline")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice, OMP_NUM_THREADS)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--loader", action="store_true",
                   help="instead: the ImageNet input pipeline on generated JPEGs vs torchvision, per worker count")
    p.add_argument("--loader-images", type=int, default=1000, help="with --loader: JPEG files to generate")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[0, 1, 2], help="with --loader: worker counts")
    p.add_argument("--ddp", action="store_true",
                   help="instead: LeNet-5 step time of devices=2 (Gloo, CPU) vs devices=1, and plain PyTorch DDP")
    p.add_argument("--saved-bytes", action="store_true",
                   help="instead: the bytes autograd keeps for backward in one forward of each variant (under "
                        "each act.impl), against the float network's")
    return p


def main(argv=None):
    """qtrain-bench; bad input (a missing dataset, a model that does not fit it) is one paragraph, exit 2."""
    try:
        bench(argv)
    except QtrainError as e:
        print("qtrain-bench: error: " + textwrap.fill(str(e), width=100, subsequent_indent="  "), file=sys.stderr)
        sys.exit(e.exit_code)


def bench(argv=None):
    p = parser()
    args = p.parse_args(argv)
    command = "qtrain-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.ddp:
        return bench_ddp(args, command)
    if args.loader:
        return bench_loader(args, command)
    if args.saved_bytes:
        return bench_saved_bytes(args, command)
    names = list(variants(args.abits))
    args.variants = args.variants or names
    unknown = [v for v in args.variants if v not in names]
    if unknown or "float" not in args.variants:
        p.error(f"--variants must include float and come from: {', '.join(names)} (unknown: {unknown})")
    if args.full_epoch:
        args.steps, args.warmup = 1, min(args.warmup, 1)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = None if args.no_data else bench_data(args, device)  # first: a missing dataset is said at once
    rows = bench_steps(args, device)
    info = {"machine": machine(device), "torch": torch.__version__, "command": command, "model": args.model,
            "data": args.data, "batch_size": args.batch_size, "precision": args.precision, "compile": args.compile,
            "steps": args.steps, "rounds": args.rounds, "abits": args.abits, "full_epoch": args.full_epoch,
            "impls": args.impls, "threads": torch.get_num_threads(),
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print_steps(info, args, rows)
    if data:
        print(f"data pipeline: {json.dumps(data)}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "steps": rows, "data": data}, indent=2) + "\n")


def print_steps(info: dict, args, rows: list[dict]) -> None:
    print(f"# {info['command']}\n# {info['machine']}, torch {info['torch']}, {args.model}/{args.data}, "
          f"batch {args.batch_size}, {args.precision}{', compiled' if args.compile else ''}, "
          f"act.impl {' and '.join(args.impls)}; "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    unit = "epoch (s)" if args.full_epoch else "step (ms)"
    print(f"| variant | median {unit} | images/s | × float | × plain PyTorch | peak GPU mem (MiB) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        peak = "—" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        plain = "—" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.2f}"
        t = r["median_step_ms"] / 1e3 if args.full_epoch else r["median_step_ms"]
        print(f"| {r['variant']} | {t:.2f} | {r['images_per_s']:,.0f} | {r['ratio_to_float']:.2f} | {plain} "
              f"| {peak} |")


def bench_saved_bytes(args, command: str) -> None:
    """Bytes kept for backward per variant and implementation, as a ratio to the float network's."""
    device = torch.device(args.device)
    rows = []
    for name, impl, overrides in variant_rows(args.abits, variants(args.abits), IMPLS):
        built = build(make_cfg(args, overrides, real_data=False), device)
        x, _ = next(iter(built.data.train))
        built.method.prepare_forward()
        rows.append({"variant": name, "impl": impl, "saved_mib": memory.saved_bytes(built.model, x) / 2**20})
    base = rows[0]["saved_mib"]
    print(f"# {command}\n# {machine(device)}, torch {torch.__version__}, {args.model}, batch {args.batch_size}")
    print("| variant | act.impl | saved for backward (MiB) | × float |\n|---|---|---|---|")
    for r in rows:
        r["ratio_to_float"] = r["saved_mib"] / base
        print(f"| {r['variant']} | {r['impl']} | {r['saved_mib']:.1f} | {r['ratio_to_float']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": machine(device), "rows": rows}, indent=2) + "\n")


def bench_ddp(args, command: str) -> None:
    root = args.data_root or os.environ.get("QTRAIN_DATA") or "data"
    mnist(root, limit_train=64)  # here, before the workers start: a missing MNIST is one paragraph
    result = ddp.run(root, rounds=args.rounds)
    print(f"# {command}\n# {machine(torch.device('cpu'))}, torch {torch.__version__}; LeNet-5/MNIST (6,400 samples), "
          f"batch 64, a2; median of {args.rounds} rounds")
    print(ddp.format_table(result))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(torch.device("cpu")), **result}, indent=2) + "\n")


def bench_loader(args, command: str) -> None:
    rows = loader.bench_loaders(args.loader_workers, args.loader_images, rounds=args.rounds)
    print(f"# {command}\n# {machine(torch.device('cpu'))}, torch {torch.__version__}, {args.loader_images} generated "
          "JPEGs, batch 64, RandomResizedCrop 224")
    loader.print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(torch.device("cpu")), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
