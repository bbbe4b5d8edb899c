"""Build the objects a run needs from its config, then call train.fit().

Also owns the two ways a run starts from an earlier one:
  init   = path of a checkpoint (weights only), or "float": train (once, cached under
           outputs/float/) the float model of the same architecture and recipe, then start from it;
  resume = true (the latest run with the same config) or a run directory: continue that run in its
           own directory, to the same result an uninterrupted run would reach (a finished run is
           left as it is and its result returned, so re-running a sweep with resume=true is safe).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import platform
import pydoc
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain import checkpoint, distributed, record
from qtrain.dataset_id import dataset_identity
from qtrain.errors import ConfigError, QtrainError
from qtrain.schedule import scale_schedule
from qtrain.validate import check_proxy, validate
from qtrain.quant import (ActLayer, clamp_learned_alphas, make_weight_quantizer, quantized_weight_names, resolve_alpha,
                          scale_alpha_gradients)
from qtrain.summary import distinct_values, format_summary, model_summary
from qtrain.lifecycle import Diverged, Interrupted, LogAlsoInto, RunLock, StopSignals, remove_stale_temporaries
from qtrain.train import Classification, DivergenceWatch, NonFinite, Regression, fit

log = logging.getLogger("qtrain")

FINGERPRINT_FILE = "fingerprint.txt"  # in each run directory: what resume=true matches on
#: keys that do not change what a run computes (left out of its fingerprint)
VOLATILE = ("resume", "progress", "device", "stop_after_epoch", "out_dir", "paper", "objective",
            "log_every_n_steps", "collective_timeout_s")
#: (dotted) keys whose default leaves a run's computation as it was before the key existed: at
#: that value they are left out of the fingerprint, so adding such a key never orphans earlier runs.
#: Every key added to the config from now on belongs here with its neutral value.
NEUTRAL = {"schedule_scale": 1, "sched.interval": "epoch", "devices": 1, "sync_bn": False}


# ---------------------------------------------------------------------------------------------
# Validation and small builders
# ---------------------------------------------------------------------------------------------


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
    proxy = None
    if ste == "proxy":
        proxy = pydoc.locate(str(cfg.ste.fn))  # None when missing (hydra's get_method would log a traceback)
        if not callable(proxy):
            raise ConfigError(f"ste.fn={cfg.ste.fn}: no such function (give an import path such as "
                              "torch.nn.functional.softplus).")
        check_proxy(proxy, cfg.ste.fn)
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


def build_scheduler(cfg: DictConfig, optimizer, steps_per_epoch: int):
    """The LR scheduler; ``interval`` (epoch | step) is read by the loop, not passed on, and a per-step
    schedule's ``total_steps: null`` becomes epochs x batches per epoch."""
    node = OmegaConf.to_container(cfg.sched, resolve=True)
    node.pop("interval", None)
    if "total_steps" in node and node["total_steps"] is None:
        node["total_steps"] = cfg.epochs * steps_per_epoch
    try:
        return instantiate(node)(optimizer)
    except (TypeError, ValueError, InstantiationException) as e:
        raise ConfigError(f"sched: {node.get('_target_')} cannot be built from the sched settings: "
                          f"{e.__cause__ or e}.") from None


def build(cfg: DictConfig, device: torch.device):
    """data, model, method, optimizer, scheduler and task for ``cfg`` (nothing trained yet)."""
    data = _instantiate(cfg.data, seed=cfg.seed, device=device)
    distributed.current().shard(data)  # a data-parallel run: this rank's share of each batch
    # _partial_: Hydra would turn the ActLayer dataclass into a config if passed to instantiate.
    make_model = _instantiate(cfg.model, _partial_=True, num_classes=data.num_classes, input_shape=data.input_shape)
    model = fitted_model(make_model, build_act_layer(cfg), data.input_shape, cfg).to(device)
    if cfg.channels_last:  # faster on CUDA and on this CPU too (docs/BENCHMARKS.md); float rounding only
        model = model.to(memory_format=torch.channels_last)
    quantizer = make_weight_quantizer(cfg.wbits, cfg.wquant)
    names = quantized_weight_names(model, cfg.quant_layers) if quantizer else []
    method = _instantiate(cfg.method)
    method.attach(model, quantizer, names)
    try:
        optimizer = instantiate(cfg.optim)(model.parameters())
    except (TypeError, ValueError, InstantiationException) as e:
        cause = e.__cause__ or e
        raise ConfigError(f"optim: {cfg.optim._target_} cannot be built from the optim settings: {cause}. Pick an "
                          "optimizer config (optim=sgd | adam) or remove keys it does not take, e.g. "
                          "~optim.momentum.") from None
    optimizer.register_step_pre_hook(lambda *_: scale_alpha_gradients(model))
    optimizer.register_step_post_hook(lambda *_: clamp_learned_alphas(model))
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    task = Regression() if data.task == "regression" else Classification()
    return data, model, method, optimizer, scheduler, task, names


# ---------------------------------------------------------------------------------------------
# Fingerprints, init=float and resume
# ---------------------------------------------------------------------------------------------


def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes what a run computes (of :func:`identity`)."""
    return identity_hash(identity(cfg))


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg: DictConfig) -> dict:
    """The config as far as it changes what a run computes, with the dataset's content identity."""
    c = OmegaConf.to_container(cfg, resolve=True)
    drop = list(VOLATILE)
    if c.get("abits") is None:  # float activations: the STE and alpha settings cannot matter
        drop += ["ste", "act"]
    if c.get("wbits") is None:
        drop += ["quant_layers", "wquant"]
    if c.get("devices", 1) == 1:  # one process: nothing to synchronise
        drop += ["sync_bn"]
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
    return c


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every (dotted) key whose value differs between two identities."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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


def float_run_dir(cfg: DictConfig, key: str) -> Path:
    """Where init=float caches the float model of ``cfg`` (``key``: the fingerprint of its float_config)."""
    return Path(cfg.out_dir).resolve() / "float" / f"{cfg.data._target_.split('.')[-1]}_" \
        f"{cfg.model._target_.split('.')[-1].lower()}_s{cfg.seed}_{key}"


def float_checkpoint(cfg: DictConfig) -> Path:
    """Path of the cached float checkpoint for ``cfg``; trains it first when missing."""
    ranks = distributed.current()
    fcfg = float_config(cfg)
    run_dir = float_run_dir(cfg, ranks.decide(fingerprint, fcfg))
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # two jobs wanting the same float model: one trains it, the other waits (train_run's own
    # RunLock on .lock is non-blocking, hence a second lock file here)
    with ranks.main_only(waiting_lock(run_dir / ".cache.lock")):
        train, resume = ranks.decide(_float_plan, run_dir, ckpt)
        if train:
            try:
                train_run(fcfg, run_dir, resume_dir=resume)
            except Interrupted as e:  # the float model continues where it stopped when this command runs again
                raise Interrupted(f"{e} (the float model that init=float trains first; running the same command "
                                  "again continues it where it stopped)", e.exit_code, None) from None
    return ckpt


@contextlib.contextmanager
def waiting_lock(path: Path):
    """An exclusive flock that waits for its holder (the float-model cache)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _float_plan(run_dir: Path, ckpt: Path) -> tuple[bool, Path | None]:
    """(train?, the run folder to resume) for the cached float model; a damaged cached model is
    recomputed, from its previous checkpoint when that is intact."""
    if (run_dir / "result.json").exists():
        state, why = checkpoint.problem(ckpt)
        if state is None:  # retrain from the previous checkpoint (or from scratch): the same weights again
            usable = checkpoint.problem(checkpoint.previous_path(ckpt))[0] is not None
            log.warning("init=float: the cached float model %s is %s; recomputing it from %s", ckpt, why,
                        "its previous checkpoint" if usable else "the start")
            (run_dir / "result.json").unlink()
            if not usable:
                shutil.rmtree(run_dir / "checkpoints")
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if (run_dir / "result.json").exists():
        log.info("init=float: reusing the float model in %s", run_dir)
        return False, None
    log.info("init=float: training the float model first, in %s", run_dir)
    return True, run_dir if checkpoint.has_checkpoint(ckpt) else None


def find_latest_run(cfg: DictConfig) -> Path | None:
    """The most recent run under out_dir (finished or not) whose fingerprint.txt matches this
    config's fingerprint; the cached float models under out_dir/float are not candidates."""
    want = fingerprint(cfg)
    root = Path(cfg.out_dir).resolve()
    best, best_time = None, -1.0
    for mark in root.glob(f"**/{FINGERPRINT_FILE}"):
        run_dir, ckpt = mark.parent, mark.parent / "checkpoints" / "last.pt"
        if run_dir.relative_to(root).parts[0] == "float" or not checkpoint.has_checkpoint(ckpt):
            continue
        when = max(p.stat().st_mtime for p in (ckpt, checkpoint.previous_path(ckpt)) if p.exists())
        if mark.read_text().strip() == want and when > best_time:
            best, best_time = run_dir, when
    return best


INIT_HINT = "Give the path of a qtrain checkpoint (…/checkpoints/last.pt) or init=float."


def check_init_file(path: str) -> None:
    """Before any data is read: the init checkpoint at least exists."""
    if not os.path.isfile(path):
        raise ConfigError(f"init={path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}. "
                          f"{INIT_HINT}")


def load_init(model, path: str) -> None:
    """Weights (and batch-norm statistics) from a checkpoint; activation alphas keep their values."""
    hint = INIT_HINT
    check_init_file(path)
    state, why = checkpoint.problem(path)
    if state is None:
        raise ConfigError(f"init={path}: the file is {why}. {hint}")
    state = state.get("model", state)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"init={path} holds no model weights (no 'model' state dict). {hint}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        sizes = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ConfigError(f"init={path} does not fit this model: {sizes}. Start from a checkpoint of the same "
                          "architecture and input (model=, model.variant, model.norm_affine, data=).") from None
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
    """Train one configuration in ``run_dir`` (or continue ``resume_dir``); returns result.json's dict.

    Raises Interrupted (a signal: checkpoint saved at the current step) and Diverged (a non-finite
    loss or weight: result.json says so, the last good checkpoint is left as it was).
    """
    ranks = distributed.current()
    validate(cfg)
    code = record.code_identity()  # now, not at the end: the checkout may change while a run trains
    own_dir, run_dir = Path(run_dir), Path(resume_dir if resume_dir is not None else run_dir)
    device = distributed.device_of(ranks, pick_device(cfg.device))
    ident = ranks.decide(identity, cfg)  # of the config as given (schedule_scale included, not yet applied)
    fp = identity_hash(ident)  # (not fingerprint(cfg): that would hash the dataset's files a second time)
    # the float model gets the same schedule_scale, applied to the float recipe
    if cfg.init not in (None, "float"):
        check_init_file(str(cfg.init))
    init_path = str(float_checkpoint(cfg)) if cfg.init == "float" else cfg.init
    given, cfg = cfg, scale_schedule(cfg)
    seed_everything(cfg.seed)
    with ranks.main_only(RunLock(run_dir)), ranks.main_only(LogAlsoInto(run_dir, own_dir)):
        for tmp in remove_stale_temporaries(run_dir) if ranks.is_main else ():
            log.info("removed %s, a temporary file left by a process that died", tmp)
        return _train_locked(cfg, given, run_dir, resume_dir, init_path, device, ident, fp, code, choices, ranks)


def _resume_state(run_dir: Path, ident: dict) -> dict:
    state, path = checkpoint.load_latest(run_dir / "checkpoints" / "last.pt")
    if state.get("identity") is not None and state["identity"] != ident:
        changes = config_differences(state["identity"], ident)
        raise ConfigError(f"resume={run_dir}: that run was trained with another config; resuming it with this one "
                          f"would mix two experiments. Differences: {'; '.join(changes[:8])}. Resume with the "
                          "run's own settings, or start a new run (without resume).")
    threads = state.get("threads")
    if threads is not None and threads != torch.get_num_threads():
        log.warning("this run was trained with %d threads and continues with %d: on a CPU the float sums then "
                    "round differently, so the result is not bitwise that of an uninterrupted run "
                    "(set OMP_NUM_THREADS=%d to keep it exact)", threads, torch.get_num_threads(), threads)
    return state


def _train_locked(cfg, given, run_dir, resume_dir, init_path, device, ident, fp, code, choices, ranks) -> dict:
    data, model, method, optimizer, scheduler, task, names = build(cfg, device)
    if init_path:
        load_init(model, init_path)
    summary = model_summary(model, names, cfg.wbits, cfg.abits, data.input_shape)
    log.info("model summary\n%s", format_summary(summary))

    start_epoch, best, elapsed_before, partial = 0, None, 0.0, None
    if resume_dir is not None and checkpoint.has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        state = _resume_state(run_dir, ident)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        record.set_rng_state(state["rng"])
        start_epoch, best, elapsed_before = state["epoch"], state["best"], state.get("elapsed_s", 0.0)
        partial = state.get("partial")
        where = f"epoch {start_epoch + 1}, after batch {partial['batches']}" if partial else f"after epoch {start_epoch}"
        log.info("resuming %s %s", run_dir, where)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    train_model = ranks.wrap(model, device, cfg.get("sync_bn", False))  # DistributedDataParallel (devices > 1)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    eval_model = train_model if ranks.world == 1 else model
    started = time.time()

    def checkpoint_state(epoch, best_now):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "method": method.state_dict(), "epoch": epoch,
                "best": dict(best_now), "rng": record.rng_state(), "config": resolved, "identity": ident,
                "threads": torch.get_num_threads(), "elapsed_s": elapsed_before + time.time() - started}

    if ranks.is_main:  # rank 0 alone writes (distributed.py)
        (run_dir / FINGERPRINT_FILE).write_text(fp + "\n")
        recorder = record.Recorder(run_dir, checkpoint_state, start_epoch, best)
        recorder.log_config(resolved, overrides_of(run_dir))
    else:
        recorder = record.NullRecorder()
    watch = DivergenceWatch(model.named_parameters(), device, ranks=ranks)
    try:
        with StopSignals(repeat_window=distributed.REPEAT_WINDOW_S if ranks.world > 1 else 0) as stop:
            outcome = fit(train_model, method, optimizer, scheduler, data, task, recorder, epochs=cfg.epochs,
                          start_epoch=start_epoch, device=device, amp_dtype=amp_dtype,
                          stop_after_epoch=cfg.stop_after_epoch, progress=cfg.progress and ranks.is_main,
                          partial=partial, stop=stop, watch=watch, sched_interval=cfg.sched.get("interval", "epoch"),
                          log_every=cfg.get("log_every_n_steps", 0) or 0, eval_model=eval_model, ranks=ranks)
    except NonFinite as e:
        last_good = recorder.rows[-1]["epoch"] if recorder.rows else 0
        where = {"epoch": e.epoch, "step": e.step, "what": e.what}
        recorder.write_result({"status": "diverged", "diverged_at": where, "last_good_epoch": last_good,
                               "run_dir": str(run_dir), **code, "config": resolved})
        kept = (f"checkpoints/last.pt still holds epoch {last_good}" if last_good else
                "no checkpoint was written (it diverged in its first epoch)")
        raise Diverged(f"The run diverged: {e.what} became non-finite (NaN or inf) in epoch {e.epoch}, "
                       f"{'at' if e.exact else 'by'} step {e.step}. Training stopped; nothing of that epoch was "
                       f"saved, and {kept}. result.json in {run_dir} says status 'diverged'. Usual causes: a "
                       f"learning rate too high (optim.lr={cfg.optim.get('lr')}), a scheduler that grows it, or "
                       "bad input values.", where) from None
    finally:
        recorder.close()
    if outcome == "interrupted":
        where = recorder.stopped_at or "at the end of an epoch"
        message = f"stopped by {stop.requested} {where}; checkpoint saved in {run_dir}."
        log.warning("%s", message)  # in the run's log too (the CLI prints it once more, with how to continue)
        raise Interrupted(message, stop.exit_code, run_dir)
    if outcome == "stopped":
        return {"status": "stopped", "run_dir": str(run_dir)}
    if not ranks.is_main:
        return {"status": "complete", "run_dir": str(run_dir)}
    result = _result(cfg, given, recorder, model, method, names, summary, device, code, init_path, choices,
                     resume_dir is not None and (start_epoch > 0 or partial is not None),
                     elapsed_before + time.time() - started, run_dir,
                     resolved)
    recorder.write_result(result)
    recorder.log_hparams(hparams_of(resolved, overrides_of(run_dir)),
                         {k: result[k] for k in ("final_test_acc", "best_test_acc", "final_test_loss",
                                                 "final_train_loss")})
    key = "acc" if result["final_test_acc"] is not None else "loss"
    log.info("done: final test %s %.6g, best %.6g (epoch %s), %.0f s", key, result[f"final_test_{key}"],
             result[f"best_test_{key}"], result["best_epoch"], result["wall_time_s"])
    return result


def overrides_of(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for this run (none outside the CLI)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        import yaml

        return list(yaml.safe_load(path.read_text()) or [])
    except (OSError, ValueError):
        return []


def hparams_of(resolved: dict, overrides: list[str]) -> dict:
    """For TensorBoard's HPARAMS tab: the settings people compare runs by, plus every override."""
    keys = {"abits": resolved.get("abits"), "wbits": resolved.get("wbits"), "seed": resolved.get("seed"),
            "epochs": resolved.get("epochs"), "schedule_scale": resolved.get("schedule_scale"),
            "method": resolved["method"]["_target_"].rsplit(".", 1)[-1],
            "model": resolved["model"]["_target_"].rsplit(".", 1)[-1],
            "data": resolved["data"]["_target_"].rsplit(".", 1)[-1], "lr": resolved["optim"].get("lr")}
    for o in overrides:
        if "=" in o and not o.startswith(("out_dir", "progress", "resume", "hydra")):
            k, v = o.split("=", 1)
            keys[k.lstrip("+~")] = v
    return {k: ("null" if v is None else v) for k, v in keys.items()}


def _result(cfg, given, recorder, model, method, names, summary, device, code, init_path, choices, resumed,
            wall_time, run_dir, resolved) -> dict:
    with method.evaluations()[0][1]:
        summary["distinct_weight_values"] = distinct_values(model, names)
    rows = recorder.rows
    last = rows[-1]
    speeds = sorted(r["train/images_per_s"] for r in rows if "train/images_per_s" in r)
    return {
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
        "resumed": resumed,
        "wall_time_s": wall_time,
        "train_images_per_s": speeds[len(speeds) // 2],
        "device": device_name(device),
        "devices": distributed.current().world,
        "sync_bn": bool(cfg.get("sync_bn", False)) and distributed.current().world > 1,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **code,
        "init": init_path,
        "choices": choices or {},
        "paper": resolved.get("paper"),
        "model_summary": summary,
        "run_dir": str(run_dir),
        "config": resolved,
    }


def main_run(cfg: DictConfig, run_dir: Path, choices: dict) -> dict:
    """Entry from the CLI (each process of a torchrun start included): pick what to resume, then
    train. ``devices > 1`` in a single process starts the workers here (distributed.launch), which
    then call :func:`train_job` with this decision."""
    ranks = distributed.current()
    devices = _devices(cfg, ranks)
    validate(cfg, warn=False)  # before the fingerprint is taken (train_run validates again, with warnings)
    resume_dir, done = ranks.decide(_choose_resume, cfg, run_dir)
    if done is not None:
        return done
    if devices > 1 and ranks.world == 1:
        return distributed.launch(cfg, run_dir, resume_dir, choices, devices)
    return train_job(cfg, run_dir, resume_dir, choices)


def train_job(cfg: DictConfig, run_dir: Path, resume_dir: Path | None, choices: dict) -> dict:
    """train_run, with a GPU out of memory as one clear error."""
    try:
        return train_run(cfg, run_dir, resume_dir, choices)
    except QtrainError:
        raise
    except torch.cuda.OutOfMemoryError as e:
        raise QtrainError(f"The GPU ran out of memory ({e}). Try a smaller data.batch_size.") from None


def _devices(cfg: DictConfig, ranks) -> int:
    """devices as a number (auto: every visible GPU), written back into cfg; under torchrun, the
    number of processes torchrun started."""
    given = cfg.get("devices", 1)
    try:
        devices = distributed.resolve_devices(given, str(cfg.device))
    except (TypeError, ValueError):
        raise ConfigError(f"devices={given}: give a number of devices (1, 2, ...) or auto.") from None
    if ranks.world > 1:
        if devices not in (1, ranks.world):
            raise ConfigError(f"devices={given}, but torchrun started {ranks.world} processes. Leave devices out "
                              "under torchrun (each process is one device), or start qtrain without torchrun.")
        devices = ranks.world
    if devices < 1:
        raise ConfigError(f"devices={given}: at least one device is needed.")
    if devices > 1 and str(cfg.device) != "cpu" and torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ConfigError(f"devices={devices}, but only {torch.cuda.device_count()} GPU(s) are visible. Use "
                          "devices=auto for all of them.")
    with open_dict(cfg):
        cfg.devices = devices
    return devices


def _choose_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict | None]:
    """(the run folder to continue or None, the result of an already complete one or None)."""
    resume_dir = None
    if cfg.resume is True:
        resume_dir = find_latest_run(cfg)
        if resume_dir is None:
            log.info("resume=true: no earlier run with this config under %s; starting a new one", cfg.out_dir)
    elif cfg.resume not in (False, None):
        resume_dir = Path(str(cfg.resume)).resolve()
        if not checkpoint.has_checkpoint(resume_dir / "checkpoints" / "last.pt"):
            raise ConfigError(f"resume={cfg.resume}: no checkpoints/last.pt there. Give a run directory of an "
                              "earlier run, or resume=true to pick the latest run of this config.")
        mark = resume_dir / FINGERPRINT_FILE
        if mark.exists() and mark.read_text().strip() != fingerprint(cfg):
            _resume_state(resume_dir, identity(cfg))  # names the differing keys
            raise ConfigError(f"resume={resume_dir}: that run was trained with another config (its fingerprint "
                              "differs). Resume with the run's own settings, or start a new run.")
    if resume_dir is None:
        return None, None
    # This invocation's own folder (Hydra made it) points at the run it continued, or found complete, so
    # that the folder explains itself and a multirun's summary reads the job's result from there.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resumed_into.txt").write_text(str(resume_dir) + "\n")
    if (resume_dir / "result.json").exists():
        done = json.loads((resume_dir / "result.json").read_text())
        if done.get("status") == "complete":
            log.info("resume: %s is already complete; nothing to do", resume_dir)
            return resume_dir, done
    return resume_dir, None
