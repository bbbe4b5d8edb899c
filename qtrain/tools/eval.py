"""`qtrain-eval`: test accuracy and loss of a trained run, without training.

    qtrain-eval outputs/runs/<...>/s0_<time>                  the run's checkpoints/last.pt
    qtrain-eval path/to/best.pt --data-root /data --json eval.json
    qtrain-eval outputs/runs/<...>/s0_<time> --bn-reestimate 100     batch norms re-estimated first

The model, its quantizers and the data are rebuilt from the config stored in the checkpoint, the
checksum is verified, and the test set is evaluated at the hard-quantized weights Q(w), exactly
as the run's own `test/acc`. Useful to check a shared or exported model, or a checkpoint on
another machine (``--data-root``, ``--device``).

``--bn-reestimate N`` measures how much of a run's test accuracy its batch norms' running statistics
cost: they are averages over the last training steps, taken at weights that kept moving (where a method
keeps flipping quantized weights, as BinaryRelax's phase II does, they may no longer fit). The statistics are
recomputed as plain averages over N training batches (the run's own batches and augmentation, epoch 0's
order) at the evaluated weights Q(w), then the test set is evaluated; the number without re-estimation
is given beside it. Nothing is saved: the checkpoint is not changed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from qtrain.errors import QtrainError
from qtrain.keys import CONFIG_DIR, current_spelling, short_name
from qtrain.run.build import build, load_init, pick_device
from qtrain.run.float_cache import float_run_dir
from qtrain.run.float_start import float_config
from qtrain.run.resume import fingerprint
from qtrain.store import checkpoint
from qtrain.train.loop import amp_context, evaluate


def load_run(path: Path, data_root: str | None = None, device: str = "cpu", limit_test: int | None = None,
             channels_last: bool | None = None, limit_train: int | None = 1):
    """(checkpoint path, state, cfg, data, model in eval mode, quantized weight names, method, task) of a run
    folder or checkpoint file: rebuilt from the config stored in the (verified) checkpoint. The memory
    format is the run's unless ``channels_last`` says otherwise (the CPU's batch norm rounds differently in
    the two, so only the run's own format reproduces its test numbers to the last bit). The training split
    holds its first ``limit_train`` images (1 by default: most callers need none; None: the run's own training split)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.exists():
        raise QtrainError(f"{path}: no such checkpoint. Give a run folder or a qtrain checkpoint file.")
    state = checkpoint.load(path)
    if "config" not in state:
        raise QtrainError(f"{path} holds no config, so the model cannot be rebuilt: it is not a qtrain run checkpoint.")
    cfg = OmegaConf.create(current_spelling(state["config"]))  # a run made before a target moved
    with open_dict(cfg):
        if data_root:
            cfg.data.root = data_root
        if limit_test is not None:  # else the run's own test set (its data.limit_test, if any)
            cfg.data.limit_test = limit_test
        if limit_train is not None:  # else the run's own training split
            cfg.data.limit_train = limit_train
        cfg.device = device
        if channels_last is not None:
            cfg.channels_last = channels_last
    built = build(cfg, pick_device(device))
    data, model, method, task, names = built.data, built.model, built.method, built.task, built.quantized
    model.load_state_dict(state["model"])
    return path, state, cfg, data, model.eval(), names, method, task


def load_start(overrides: list[str], limit_test: int | None = None, limit_train: int | None = 1):
    """(cell config, its built objects with the float weights loaded, the float run's folder) of a cell that
    starts from init=float: its float model with the cell's quantizers put in, before any quantization-aware
    training (epoch 0 of the cell's curve). The float model is the one the cell's init=float would use
    (found by the same fingerprint); it must have finished, as this never trains one. ``limit_train``: as
    load_run's."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cfg.init != "float":
        raise QtrainError(f"init={cfg.init}: this measures the start of a cell that begins from init=float.")
    run_dir = float_run_dir(cfg, fingerprint(float_config(cfg)))  # (before the data limits below change cfg)
    if not (run_dir / "result.json").exists():
        raise QtrainError(f"{run_dir}: no finished float model for this cell. Run the cell (it trains the float model "
                          "first) or check out_dir= and the cell's overrides.")
    with open_dict(cfg):
        if limit_test is not None:
            cfg.data.limit_test = limit_test
        if limit_train is not None:
            cfg.data.limit_train = limit_train
    built = build(cfg, pick_device("cpu"))
    load_init(built.model, str(run_dir / "checkpoints" / "last.pt"))
    return cfg, built, run_dir


@torch.no_grad()
def reestimate_batch_norm(model: torch.nn.Module, batches, amp_dtype=None) -> int:
    """Replace every batch norm's running mean and variance by plain averages over ``batches`` (the
    model in its training forward, at whatever weights are installed); returns how many batches were
    used. The model is left in eval mode, its momentum settings as they were."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        raise QtrainError("the model has no batch norm with running statistics: nothing to re-estimate.")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the batches, not an exponential one
    n = 0
    try:
        model.train()
        for x, _ in batches:
            with amp_context(x.device, amp_dtype):
                model(x)
            n += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    if n == 0:
        raise QtrainError("no training batch to re-estimate the batch norms with.")
    return n


def evaluate_checkpoint(path: Path, data_root: str | None = None, device: str = "cpu",
                        limit_test: int | None = None, bn_reestimate: int | None = None) -> dict:
    if bn_reestimate is not None and bn_reestimate < 1:
        raise QtrainError(f"--bn-reestimate {bn_reestimate}: give a number of training batches, at least 1.")
    limit_train = None if bn_reestimate else 1  # the run's own training split: its epoch-0 batches, as trained on
    path, state, cfg, data, model, names, method, task = load_run(path, data_root, device, limit_test,
                                                                  limit_train=limit_train)
    dev = pick_device(device)
    name, context = method.evaluations()[0]  # the hard-quantized weights Q(w)
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    with context:
        result = evaluate(model, data.test, task, dev, amp)
    out = {"checkpoint": str(path), "epoch": state.get("epoch"), "test_acc": result["acc"],
           "test_loss": result["loss"], "test_samples": sum(len(y) for _, y in data.test),
           "data": short_name(cfg.data), "data_root": str(cfg.data.get("root")),
           "device": str(dev)}
    if bn_reestimate:
        data.train.set_epoch(0)
        _, context = method.evaluations()[0]  # (a fresh context: each is used once)
        with context:
            used = reestimate_batch_norm(model, itertools.islice(data.train, bn_reestimate), amp)
            after = evaluate(model, data.test, task, dev, amp)
        out.update({"bn_reestimated_batches": used, "test_acc_bn_reestimated": after["acc"],
                    "test_loss_bn_reestimated": after["loss"]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="qtrain-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder or a checkpoint file (.pt)")
    p.add_argument("--data-root", help="where the data is on this machine (default: as when it was trained)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--limit-test", type=int, help="evaluate on the first N test samples (default: the run's test set)")
    p.add_argument("--bn-reestimate", type=int, metavar="N",
                   help="also evaluate after re-estimating the batch norms on N training batches (see above)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    try:
        out = evaluate_checkpoint(args.path, args.data_root, args.device, args.limit_test, args.bn_reestimate)
    except QtrainError as e:
        print(f"qtrain-eval: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
