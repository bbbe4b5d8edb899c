"""Build the objects a run needs from its config, then call train.fit().

Also owns the two ways a run starts from an earlier one:
  init   = path of a checkpoint (weights only), or "float": train (once, cached under
           outputs/float/) the float model of the same architecture and recipe, then start from it;
  resume = true (the latest run with the same config) or a run directory: continue that run in its
           own directory, to the same result an uninterrupted run would reach (a finished run is
           left as it is and its result returned, so re-running a sweep with resume=true is safe).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain import record
from qtrain.dataset_id import dataset_identity
from qtrain.errors import ConfigError, QtrainError
from qtrain.schedule import check_scale, scale_schedule
from qtrain.quant import QUANT_LAYER_RULES, ActLayer, clamp_learned_alphas, make_weight_quantizer, quantized_weight_names, resolve_alpha
from qtrain.summary import distinct_values, format_summary, model_summary
from qtrain.train import Classification, Regression, fit

log = logging.getLogger("qtrain")

FINGERPRINT_FILE = "fingerprint.txt"  # in each run directory: what resume=true matches on
#: keys that do not change what a run computes (left out of its fingerprint)
VOLATILE = ("resume", "progress", "device", "stop_after_epoch", "out_dir", "paper")
#: (dotted) keys whose default leaves a run's computation as it was before the key existed: at
#: that value they are left out of the fingerprint, so adding such a key never orphans earlier runs.
#: Every key added to the config from now on belongs here with its neutral value.
NEUTRAL = {"schedule_scale": 1}


# ---------------------------------------------------------------------------------------------
# Validation and small builders
# ---------------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    def positive_int_or_none(key):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{key} must be a positive integer number of bits or null (float), got {v!r}.")

    positive_int_or_none("abits")
    positive_int_or_none("wbits")
    if not isinstance(cfg.epochs, int) or cfg.epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {cfg.epochs!r}.")
    check_scale(cfg.get("schedule_scale", 1))
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg.device!r}.")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}.")
    make_weight_quantizer(cfg.wbits, cfg.wquant)  # checks wquant before any data is read
    if cfg.quant_layers not in QUANT_LAYER_RULES:
        raise ConfigError(f"quant_layers must be one of {', '.join(QUANT_LAYER_RULES)}, got {cfg.quant_layers!r}.")
    for key in ("limit_train", "limit_test", "batch_size"):
        v = cfg.data.get(key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"data.{key} must be a positive integer{' or null' if 'limit' in key else ''}, got {v!r}.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for, but PyTorch sees no CUDA device here. Use device=cpu or auto.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_act_layer(cfg: DictConfig) -> ActLayer:
    a = cfg.act
    ste = cfg.ste.name
    proxy = get_method(cfg.ste.fn) if ste == "proxy" else None
    alpha = resolve_alpha(cfg.abits, a.alpha, a.rounding) if cfg.abits is not None else 1.0
    return ActLayer(bits=cfg.abits, alpha=alpha, ste=ste, rounding=a.rounding, learn_alpha=a.learn_alpha,
                    alpha_grad=a.alpha_grad, alpha_grad_scale=a.alpha_grad_scale, alpha_grad_clip=a.alpha_grad_clip,
                    alpha_clamp=tuple(a.alpha_clamp), share_block_alpha=a.share_block_alpha, proxy=proxy)


def _instantiate(node, **kwargs):
    """hydra's instantiate, but our own errors (missing data, bad values) come out unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, QtrainError):
            raise e.__cause__ from None
        raise


def fitted_model(make_model, act_layer, input_shape, cfg):
    """Build the model and push one dummy batch through it, so that a model/data mismatch
    (e.g. VGG's five poolings on 28x28 MNIST) is one clear error, not a traceback mid-run."""
    model_name, data_name = (cfg[g]._target_.split(".")[-1] for g in ("model", "data"))
    try:
        model = make_model(act_layer=act_layer)
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
        return model.train()
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model {model_name} does not fit data {data_name} (input shape {tuple(input_shape)}): {e}. "
                          "Pick a model for that input, e.g. lenet5 or resnet20 for MNIST, twolayer for teacher.") from None


def build(cfg: DictConfig, device: torch.device):
    """data, model, method, optimizer, scheduler and task for ``cfg`` (nothing trained yet)."""
    data = _instantiate(cfg.data, seed=cfg.seed, device=device)
    # _partial_: Hydra would turn the ActLayer dataclass into a config if passed to instantiate.
    make_model = _instantiate(cfg.model, _partial_=True, num_classes=data.num_classes, input_shape=data.input_shape)
    model = fitted_model(make_model, build_act_layer(cfg), data.input_shape, cfg).to(device)
    if cfg.channels_last:  # faster on CUDA and on this CPU too (docs/BENCHMARKS.md); float rounding only
        model = model.to(memory_format=torch.channels_last)
    quantizer = make_weight_quantizer(cfg.wbits, cfg.wquant)
    names = quantized_weight_names(model, cfg.quant_layers) if quantizer else []
    method = _instantiate(cfg.method)
    method.attach(model, quantizer, names)
    optimizer = instantiate(cfg.optim)(model.parameters())
    optimizer.register_step_post_hook(lambda *_: clamp_learned_alphas(model))
    scheduler = instantiate(cfg.sched)(optimizer)
    task = Regression() if data.task == "regression" else Classification()
    return data, model, method, optimizer, scheduler, task, names


# ---------------------------------------------------------------------------------------------
# Fingerprints, init=float and resume
# ---------------------------------------------------------------------------------------------


def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes what a run computes."""
    c = OmegaConf.to_container(cfg, resolve=True)
    drop = list(VOLATILE)
    if c.get("abits") is None:  # float activations: the STE and alpha settings cannot matter
        drop += ["ste", "act"]
    if c.get("wbits") is None:
        drop += ["quant_layers", "wquant"]
    for k in drop:
        c.pop(k, None)
    for path, neutral in NEUTRAL.items():  # keys added later do not change older runs' fingerprints
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            node.pop(leaf)
    # The dataset by what it is (its files' content), not by where it lives.
    c.get("data", {}).pop("root", None)
    c["data_identity"] = dataset_identity(cfg.data)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def float_config(cfg: DictConfig) -> DictConfig:
    """The config of the float model a quantized run starts from: same data, model and recipe,
    float weights and activations, plus the experiment's ``pretrain`` overrides."""
    f = copy.deepcopy(cfg)
    with open_dict(f):
        f.abits, f.wbits, f.init, f.resume, f.stop_after_epoch = None, None, None, False, None
        f.method = OmegaConf.create({"_target_": "qtrain.methods.Float"})
        f.act.learn_alpha = False
        f.paper = None
        f.pretrain = {}
    return OmegaConf.merge(f, cfg.get("pretrain") or {})


def float_checkpoint(cfg: DictConfig) -> Path:
    """Path of the cached float checkpoint for ``cfg``; trains it first when missing."""
    fcfg = float_config(cfg)
    key = fingerprint(fcfg)
    run_dir = Path(cfg.out_dir).resolve() / "float" / f"{cfg.data._target_.split('.')[-1]}_" \
        f"{cfg.model._target_.split('.')[-1].lower()}_s{cfg.seed}_{key}"
    ckpt = run_dir / "checkpoints" / "last.pt"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:  # two jobs wanting the same float model: one trains it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (run_dir / "result.json").exists():
            log.info("init=float: reusing the float model in %s", run_dir)
        else:
            log.info("init=float: training the float model first, in %s", run_dir)
            resume = run_dir if ckpt.exists() else None
            train_run(fcfg, run_dir, resume_dir=resume)
    return ckpt


def find_latest_run(cfg: DictConfig) -> Path | None:
    """The most recent run under out_dir (finished or not) whose fingerprint.txt matches this
    config's fingerprint; the cached float models under out_dir/float are not candidates."""
    want = fingerprint(cfg)
    root = Path(cfg.out_dir).resolve()
    best, best_time = None, -1.0
    for mark in root.glob(f"**/{FINGERPRINT_FILE}"):
        run_dir, ckpt = mark.parent, mark.parent / "checkpoints" / "last.pt"
        if run_dir.relative_to(root).parts[0] == "float" or not ckpt.exists():
            continue
        if mark.read_text().strip() == want and ckpt.stat().st_mtime > best_time:
            best, best_time = run_dir, ckpt.stat().st_mtime
    return best


def load_init(model, path: str) -> None:
    """Weights (and batch-norm statistics) from a checkpoint; activation alphas keep their values."""
    if not os.path.exists(path):
        raise ConfigError(f"init={path}: no such checkpoint. Give the path of a qtrain checkpoint "
                          "(…/checkpoints/last.pt) or init=float.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".alpha")]
    if missing or unexpected:
        raise ConfigError(f"init={path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                          "Start from a checkpoint of the same architecture (model=, model.norm_affine, data=).")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_run(cfg: DictConfig, run_dir: Path, resume_dir: Path | None = None, choices: dict | None = None) -> dict:
    """Train one configuration in ``run_dir`` (or continue ``resume_dir``); returns result.json's dict."""
    validate(cfg)
    code = record.code_identity()  # now, not at the end: the checkout may change while a run trains
    if resume_dir is not None:
        run_dir = resume_dir
    run_dir = Path(run_dir)
    device = pick_device(cfg.device)
    fp = fingerprint(cfg)  # of the config as given (schedule_scale included, not yet applied)
    # the float model gets the same schedule_scale, applied to the float recipe
    init_path = str(float_checkpoint(cfg)) if cfg.init == "float" else cfg.init
    given, cfg = cfg, scale_schedule(cfg)
    validate(cfg)
    seed_everything(cfg.seed)

    data, model, method, optimizer, scheduler, task, names = build(cfg, device)
    if init_path:
        load_init(model, init_path)
    summary = model_summary(model, names, cfg.wbits, cfg.abits)
    log.info("model summary\n%s", format_summary(summary))

    start_epoch, best, elapsed_before = 0, None, 0.0
    if resume_dir is not None and (run_dir / "checkpoints" / "last.pt").exists():
        # to the CPU: load_state_dict copies onto the parameters' device, and RNG states must stay on the CPU
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        record.set_rng_state(state["rng"])
        start_epoch, best, elapsed_before = state["epoch"], state["best"], state.get("elapsed_s", 0.0)
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    train_model = torch.compile(model) if cfg.compile else model
    started = time.time()

    def checkpoint_state(epoch, best_now):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "method": method.state_dict(), "epoch": epoch,
                "best": dict(best_now), "rng": record.rng_state(), "config": resolved,
                "elapsed_s": elapsed_before + time.time() - started}

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FINGERPRINT_FILE).write_text(fp + "\n")
    recorder = record.Recorder(run_dir, checkpoint_state, start_epoch, best)
    try:
        complete = fit(train_model, method, optimizer, scheduler, data, task, recorder, epochs=cfg.epochs,
                       start_epoch=start_epoch, device=device, amp_dtype=amp_dtype,
                       stop_after_epoch=cfg.stop_after_epoch, progress=cfg.progress)
    finally:
        recorder.close()
    if not complete:
        return {"status": "stopped", "run_dir": str(run_dir)}

    with method.evaluations()[0][1]:
        summary["distinct_weight_values"] = distinct_values(model, names)
    rows = recorder.rows
    last = rows[-1]
    speeds = sorted(r["train/images_per_s"] for r in rows if "train/images_per_s" in r)
    result = {
        "status": "complete",
        "final_test_acc": last.get("test/acc"),
        "final_test_loss": last.get("test/loss"),
        "best_test_acc": recorder.best["value"] if recorder.best["key"] == "test/acc" else None,
        "best_test_loss": recorder.best["value"] if recorder.best["key"] == "test/loss" else None,
        "best_epoch": recorder.best["epoch"],
        "final_train_loss": last.get("train/loss"),
        "final_train_acc": last.get("train/acc"),
        "epochs": cfg.epochs,
        "schedule_scale": cfg.get("schedule_scale", 1),
        "unscaled_epochs": given.epochs,
        "data_limited": cfg.data.get("limit_train") is not None or cfg.data.get("limit_test") is not None,
        "resumed": resume_dir is not None and start_epoch > 0,
        "wall_time_s": elapsed_before + time.time() - started,
        "train_images_per_s": speeds[len(speeds) // 2],
        "device": device_name(device),
        "torch_version": torch.__version__,
        **code,
        "init": init_path,
        "choices": choices or {},
        "paper": resolved.get("paper"),
        "model_summary": summary,
        "run_dir": str(run_dir),
        "config": resolved,
    }
    recorder.write_result(result)
    key = "acc" if result["final_test_acc"] is not None else "loss"
    log.info("done: final test %s %.6g, best %.6g (epoch %s), %.0f s", key, result[f"final_test_{key}"],
             result[f"best_test_{key}"], result["best_epoch"], result["wall_time_s"])
    return result


def main_run(cfg: DictConfig, run_dir: Path, choices: dict) -> dict:
    """Entry from the CLI: pick what to resume, then train."""
    resume_dir = None
    if cfg.resume is True:
        resume_dir = find_latest_run(cfg)
        if resume_dir is None:
            log.info("resume=true: no earlier run with this config under %s; starting a new one", cfg.out_dir)
    elif cfg.resume not in (False, None):
        resume_dir = Path(str(cfg.resume)).resolve()
        if not (resume_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"resume={cfg.resume}: no checkpoints/last.pt there. Give a run directory of an "
                              "earlier run, or resume=true to pick the latest run of this config.")
    if resume_dir is not None and (resume_dir / "result.json").exists():
        log.info("resume: %s is already complete; nothing to do", resume_dir)
        return json.loads((resume_dir / "result.json").read_text())
    if resume_dir is not None:
        (run_dir / "resumed_into.txt").write_text(str(resume_dir) + "\n")
    try:
        return train_run(cfg, run_dir, resume_dir, choices)
    except QtrainError:
        raise
    except torch.cuda.OutOfMemoryError as e:
        raise QtrainError(f"The GPU ran out of memory ({e}). Try a smaller data.batch_size.") from None
