"""How much of a run's per-epoch training loss is the epoch's data draw: one *fixed* model's training
loss on the augmented training data of each epoch, as a run computes it (train-mode batch norm, the
epoch's order, crops and flips), with no weight update.

    python scripts/epoch_draw_loss.py measure experiment=ste/cifar10_resnet20_a4_instability_control \
        init=<run>/checkpoints/last.pt --epochs 1-20 [--json draws.jsonl]
    python scripts/epoch_draw_loss.py table draws.jsonl <run dir> [<run dir> ...]   # markdown: each run's
        per-epoch training loss beside the draw's, and the difference

Why: qtrain draws epoch e's order and augmentation from (seed, e) alone, so every run with that seed
sees the same images at the same epoch index, and a model trained on those draws fits some of them
better than others. A run that barely moves its weights (the [STE] §4.2 runs at lr 1e-5 start from a
finished cell) then shows a training-loss curve that is mostly this draw-to-draw pattern. Comparing
the run's curve with its start model's on the same draws separates the two.

The arguments are the run's own overrides; the model is the one ``init=`` names (the run's start).
Batch-norm running statistics are restored after every epoch, so each draw sees the same model.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qtrain.errors import QtrainError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def epoch_numbers(text: str) -> list[int]:
    """'1-20' or '1,8,9' -> 1-based epoch numbers."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise QtrainError(f"--epochs {text}: give 1-based epochs, e.g. 1-20 or 1,8,9.")
    return out


def draw_losses(overrides: list[str], epochs: list[int]):
    """Yield one dict per epoch: the fixed model's training loss and accuracy on that epoch's draw."""
    from qtrain.run.build import build, load_init, pick_device, seed_everything

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cfg.init in (None, "float"):
        raise QtrainError("give init=<checkpoint>: the model whose loss on each epoch's draw is measured.")
    seed_everything(cfg.seed)
    device = pick_device("cpu")
    built = build(cfg, device)
    data, model, method, task = built.data, built.model, built.method, built.task
    load_init(model, str(cfg.init))
    start = copy.deepcopy(model.state_dict())
    for epoch in epochs:
        model.load_state_dict(start)  # the batch-norm running statistics a train-mode pass updates
        model.train()
        method.prepare_forward()  # the surrogate the run trains through (Q(w) for quantized weights)
        data.train.set_epoch(epoch - 1)
        loss_sum, correct, n, t0 = 0.0, 0, 0, time.perf_counter()
        with torch.no_grad():
            for x, y in data.train:
                out = model(x)
                loss_sum += float(task.loss(out, y)) * len(y)
                correct += int(task.correct(out, y))
                n += len(y)
        method.before_step()  # restores the latent weights
        yield {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": 100.0 * correct / n, "images": n,
               "seconds": round(time.perf_counter() - t0, 1), "init": str(cfg.init), "overrides": overrides,
               "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(draws: Path, runs: list[Path]) -> str:
    """Markdown: per epoch, the fixed model's loss on the draw, then each run's logged loss and its
    difference from the draw's (what the run's training changed, net of the draw)."""

    def rows(path):
        try:
            return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}
        except (OSError, ValueError, KeyError) as e:
            raise QtrainError(f"{path}: cannot read its per-epoch rows ({e}).") from None

    base = {e: r["train_loss"] for e, r in rows(draws).items()}
    logged = [rows(run / "metrics.jsonl") for run in runs]
    lines = ["| epoch | fixed model on the epoch's draw | " + " | ".join(f"{run.name}: loss (Δ)" for run in runs) + " |",
             "|---" * (2 + len(runs)) + "|"]
    for epoch in sorted(base):
        cells = [f"{m[epoch]['train/loss']:.4f} ({m[epoch]['train/loss'] - base[epoch]:+.4f})" if epoch in m else "—"
                 for m in logged]
        lines.append(f"| {epoch} | {base[epoch]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd = p.add_subparsers(dest="command", required=True)
    m = cmd.add_parser("measure", help="a fixed model's training loss on each epoch's draw")
    m.add_argument("overrides", nargs="+", help="the run's overrides, as given to qtrain (init= included)")
    m.add_argument("--epochs", default="1-20", help="1-based epochs whose draws to measure (default 1-20)")
    m.add_argument("--json", type=Path, help="also append each epoch's result, one JSON object per line")
    t = cmd.add_parser("table", help="runs' per-epoch training loss beside the draws' (markdown)")
    t.add_argument("draws", type=Path, help="what measure --json wrote")
    t.add_argument("runs", type=Path, nargs="+", help="run folders (their metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        if args.command == "table":
            print(table(args.draws, args.runs))
            return
        for out in draw_losses(args.overrides, epoch_numbers(args.epochs)):
            line = json.dumps(out)
            print(line, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(line + "\n")
    except QtrainError as e:
        print(f"epoch_draw_loss: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
