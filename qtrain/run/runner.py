"""One run from start to end: pick what to resume (resume.py), build the objects (build.py),
train them (qtrain.train.loop.fit) under the run's lock and signals (lifecycle.py), and write result.json.

The two ways a run starts from an earlier one:
  init   = path of a checkpoint (weights only), or "float": the float model of the same architecture and
           recipe, trained once and cached under ``<out_dir>/float/`` (float_start.py, float_cache.py);
  resume = true (the latest run with the same config) or a run directory: continue that run in its
           own directory, to the same result an uninterrupted run would reach (a finished run is
           left as it is and its result returned, so re-running a sweep with resume=true is safe).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain.errors import ConfigError, Diverged, Interrupted, QtrainError
from qtrain.keys import short_name
from qtrain.parallel import launcher
from qtrain.parallel.ranks import REPEAT_WINDOW_S, Ranks, current_ranks, device_of
from qtrain.run.build import build, check_init_file, load_init, pick_device, replayed_draws, seed_everything
from qtrain.run.float_cache import float_checkpoint, float_start_record
from qtrain.run.lifecycle import (LogAlsoInto, RunLock, StopSignals, quit_on_signals_outside_training,
                                  remove_stale_temporaries)
from qtrain.run.resume import FINGERPRINT_FILE, choose_resume, identity, identity_hash, resume_state
from qtrain.run.schedule import scale_schedule
from qtrain.run.validate import validate
from qtrain.store import checkpoint, record
from qtrain.store.summary import distinct_values, format_summary, model_summary
from qtrain.train.loop import DivergenceWatch, NonFinite, Plan, Training, fit

log = logging.getLogger("qtrain")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class RunSpec:
    """One run as :func:`train_run` settled it, before anything is built: ``cfg`` with its
    schedule_scale applied, ``given`` as it came; ``ident``/``fingerprint`` of ``given``."""

    cfg: DictConfig
    given: DictConfig
    run_dir: Path
    resume_dir: Path | None
    init_path: str | None
    device: torch.device
    ident: dict
    fingerprint: str
    code: dict
    choices: dict
    ranks: Ranks

    @property
    def resolved(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)


@dataclass
class StartPoint:
    """Where training starts: epoch 0, or where the run's last checkpoint left it."""

    epoch: int = 0
    best: dict | None = None
    elapsed_before: float = 0.0
    partial: dict | None = None

    @property
    def resumed(self) -> bool:
        return self.epoch > 0 or self.partial is not None


def train_run(cfg: DictConfig, run_dir: Path, resume_dir: Path | None = None, choices: dict | None = None) -> dict:
    """Train one configuration in ``run_dir`` (or continue ``resume_dir``); returns result.json's dict.

    Raises Interrupted (a signal: checkpoint saved at the current step) and Diverged (a non-finite
    loss or weight: result.json says so, the last good checkpoint is left as it was).
    """
    ranks = current_ranks()
    validate(cfg)
    code = record.code_identity()  # now, not at the end: the checkout may change while a run trains
    run_dir = Path(resume_dir if resume_dir is not None else run_dir)
    device = device_of(ranks, pick_device(cfg.device))
    ident = ranks.decide(identity, cfg)  # of the config as given (schedule_scale included, not yet applied)
    fp = identity_hash(ident)  # (not fingerprint(cfg): that would hash the dataset's files a second time)
    if cfg.init not in (None, "float"):
        check_init_file(str(cfg.init))
    # the float model gets the run's schedule_scale, unless pretrain.schedule_scale gives it its own
    init_path = str(float_checkpoint(cfg, train_run)) if cfg.init == "float" else cfg.init
    spec = RunSpec(scale_schedule(cfg), cfg, run_dir, resume_dir, init_path, device, ident, fp, code, choices or {},
                   ranks)
    seed_everything(cfg.seed)
    with ranks.main_only(RunLock(run_dir)), ranks.main_only(LogAlsoInto(run_dir)):
        for tmp in remove_stale_temporaries(run_dir) if ranks.is_main else ():
            log.info("removed %s, a temporary file left by a process that died", tmp)
        return _train_locked(spec)


def _train_locked(spec: RunSpec) -> dict:
    cfg, ranks = spec.cfg, spec.ranks
    built = build(cfg, spec.device)
    if spec.init_path:
        start_config = load_init(built.model, spec.init_path)
        warning = replayed_draws(cfg, start_config) if cfg.init != "float" else None
        if warning and ranks.is_main:
            log.warning("%s", warning)
    summary = model_summary(built.model, built.quantized, cfg.wbits, cfg.abits, built.data.input_shape)
    log.info("model summary\n%s", format_summary(summary))
    start = _restore(spec, built)
    resolved = spec.resolved
    train_model = ranks.wrap(built.model, spec.device, cfg.get("sync_bn", False))  # DistributedDataParallel (devices > 1)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    training = Training(train_model, built.method, built.optimizer, built.task, spec.device, built.scheduler,
                        amp_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                        sched_interval=cfg.sched.get("interval", "epoch"), ranks=ranks,
                        eval_model=train_model if ranks.world == 1 else built.model)
    plan = Plan(cfg.epochs, start.epoch, start.partial, cfg.stop_after_epoch, cfg.progress and ranks.is_main,
                cfg.get("log_every_n_steps", 0) or 0)
    started = time.time()
    recorder = _recorder(spec, built, start, started, resolved)
    watch = DivergenceWatch(built.model.named_parameters(), spec.device, ranks=ranks)
    try:
        with StopSignals(repeat_window=REPEAT_WINDOW_S if ranks.world > 1 else 0) as stop:
            outcome = fit(training, built.data, recorder, plan, stop=stop, watch=watch)
    except NonFinite as e:
        raise _diverged(spec, recorder, e, resolved) from None
    finally:
        recorder.close()
    if outcome == "interrupted":
        where = recorder.stopped_at or "at the end of an epoch"
        message = f"stopped by {stop.requested} {where}; checkpoint saved in {spec.run_dir}."
        log.warning("%s", message)  # in the run's log too (the CLI prints it once more, with how to continue)
        raise Interrupted(message, stop.exit_code, spec.run_dir)
    if outcome == "stopped":
        return {"status": "stopped", "run_dir": str(spec.run_dir)}
    if not ranks.is_main:
        return {"status": "complete", "run_dir": str(spec.run_dir)}
    result = _result(spec, built, recorder, summary, start.resumed and spec.resume_dir is not None,
                     start.elapsed_before + time.time() - started)
    recorder.write_result(result)
    recorder.log_hparams(hparams_of(resolved, overrides_of(spec.run_dir)),
                         {k: result[k] for k in ("final_test_acc", "best_test_acc", "final_test_loss",
                                                 "final_train_loss")})
    key = "acc" if result["final_test_acc"] is not None else "loss"
    log.info("done: final test %s %.6g, best %.6g (epoch %s), %.0f s", key, result[f"final_test_{key}"],
             result[f"best_test_{key}"], result["best_epoch"], result["wall_time_s"])
    return result


def _restore(spec: RunSpec, built) -> StartPoint:
    """The state of the run's last checkpoint put back into the objects (a resumed run), or epoch 0."""
    if spec.resume_dir is None or not checkpoint.has_checkpoint(spec.run_dir / "checkpoints" / "last.pt"):
        return StartPoint()
    state = resume_state(spec.run_dir, spec.ident)
    built.model.load_state_dict(state["model"])
    built.optimizer.load_state_dict(state["optimizer"])
    built.scheduler.load_state_dict(state["scheduler"])
    built.method.load_state_dict(state["method"])
    record.set_rng_state(state["rng"])
    start = StartPoint(state["epoch"], state["best"], state.get("elapsed_s", 0.0), state.get("partial"))
    where = f"epoch {start.epoch + 1}, after batch {start.partial['batches']}" if start.partial \
        else f"after epoch {start.epoch}"
    log.info("resuming %s %s", spec.run_dir, where)
    return start


def _recorder(spec: RunSpec, built, start: StartPoint, started: float, resolved: dict):
    """Rank 0's record of the run (metrics, TensorBoard, checkpoints); nothing on the other ranks."""
    if not spec.ranks.is_main:  # rank 0 alone writes (qtrain/parallel/ranks.py)
        return record.NullRecorder()

    def checkpoint_state(epoch, best_now):
        return {"model": built.model.state_dict(), "optimizer": built.optimizer.state_dict(),
                "scheduler": built.scheduler.state_dict(), "method": built.method.state_dict(), "epoch": epoch,
                "best": dict(best_now), "rng": record.rng_state(), "config": resolved, "identity": spec.ident,
                "threads": torch.get_num_threads(), "elapsed_s": start.elapsed_before + time.time() - started}

    (spec.run_dir / FINGERPRINT_FILE).write_text(spec.fingerprint + "\n")
    done_steps = start.epoch * len(built.data.train) + (start.partial["batches"] if start.partial else 0)
    recorder = record.Recorder(spec.run_dir, checkpoint_state, start.epoch, start.best, start_step=done_steps)
    recorder.log_config(resolved, overrides_of(spec.run_dir))
    return recorder


def _diverged(spec: RunSpec, recorder, e: NonFinite, resolved: dict) -> Diverged:
    """result.json says 'diverged' (where, and which epoch the checkpoint holds); the error says so too."""
    last_good = recorder.rows[-1]["epoch"] if recorder.rows else 0
    where = {"epoch": e.epoch, "step": e.step, "what": e.what}
    recorder.write_result({"status": "diverged", "diverged_at": where, "last_good_epoch": last_good,
                           "run_dir": str(spec.run_dir), **spec.code, "config": resolved})
    kept = (f"checkpoints/last.pt still holds epoch {last_good}" if last_good else
            "no checkpoint was written (it diverged in its first epoch)")
    return Diverged(f"The run diverged: {e.what} became non-finite (NaN or inf) in epoch {e.epoch}, "
                    f"{'at' if e.exact else 'by'} step {e.step}. Training stopped; nothing of that epoch was "
                    f"saved, and {kept}. result.json in {spec.run_dir} says status 'diverged'. Usual causes: a "
                    f"learning rate too high (optim.lr={spec.cfg.optim.get('lr')}), a scheduler that grows it, or "
                    "bad input values.", where)


def overrides_of(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for this run (none outside the CLI)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        return list(yaml.safe_load(path.read_text()) or [])
    except (OSError, ValueError):
        return []


def hparams_of(resolved: dict, overrides: list[str]) -> dict:
    """For TensorBoard's HPARAMS tab: the settings people compare runs by, plus every override."""
    keys = {"abits": resolved.get("abits"), "wbits": resolved.get("wbits"), "seed": resolved.get("seed"),
            "epochs": resolved.get("epochs"), "schedule_scale": resolved.get("schedule_scale"),
            "method": short_name(resolved["method"]), "model": short_name(resolved["model"]),
            "data": short_name(resolved["data"]), "lr": resolved["optim"].get("lr")}
    for o in overrides:
        if "=" in o and not o.startswith(("out_dir", "progress", "resume", "hydra")):
            k, v = o.split("=", 1)
            keys[k.lstrip("+~")] = v
    return {k: ("null" if v is None else v) for k, v in keys.items()}


def _result(spec: RunSpec, built, recorder, summary: dict, resumed: bool, wall_time: float) -> dict:
    cfg, resolved = spec.cfg, spec.resolved
    with built.method.evaluations()[0][1]:
        summary["distinct_weight_values"] = distinct_values(built.model, built.quantized)
    rows = recorder.rows
    last = rows[-1]
    speeds = sorted(r["train/images_per_s"] for r in rows if "train/images_per_s" in r)
    best = recorder.best
    return {
        "status": "complete",
        "final_test_acc": last.get("test/acc"),
        "final_test_loss": last.get("test/loss"),
        "best_test_acc": best["value"] if best["key"] == "test/acc" else None,
        "best_test_loss": best["value"] if best["key"] == "test/loss" else None,
        "best_epoch": best["epoch"],
        "final_train_loss": last.get("train/loss"),
        "final_train_acc": last.get("train/acc"),
        "epochs": cfg.epochs,
        "schedule_scale": cfg.get("schedule_scale", 1),
        "unscaled_epochs": spec.given.epochs,
        "data_limited": cfg.data.get("limit_train") is not None or cfg.data.get("limit_test") is not None,
        "resumed": resumed,
        "wall_time_s": wall_time,
        "train_images_per_s": speeds[len(speeds) // 2],
        "device": device_name(spec.device),
        "devices": spec.ranks.world,
        "sync_bn": bool(cfg.get("sync_bn", False)) and spec.ranks.world > 1,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **spec.code,
        "init": spec.init_path,
        **({"float_start": float_start_record(Path(spec.init_path))} if spec.given.init == "float" else {}),
        "choices": spec.choices,
        "paper": resolved.get("paper"),
        "model_summary": summary,
        "run_dir": str(spec.run_dir),
        "config": resolved,
    }


def main_run(cfg: DictConfig, run_dir: Path, choices: dict) -> dict:
    """Entry from the CLI (each process of a torchrun start included): pick what to resume, then
    train. ``devices > 1`` in a single process starts the workers here (parallel.launcher), which
    then call :func:`train_job` with this decision."""
    ranks = current_ranks()
    devices = _devices(cfg, ranks)
    validate(cfg, warn=False)  # before the fingerprint is taken (train_run validates again, with warnings)
    resume_dir, done = ranks.decide(choose_resume, cfg, run_dir)
    if done is not None:
        return done
    if devices > 1 and ranks.world == 1:
        return launcher.launch(WORKER_JOB, cfg, run_dir, resume_dir, choices, devices)
    return train_job(cfg, run_dir, resume_dir, choices)


def train_job(cfg: DictConfig, run_dir: Path, resume_dir: Path | None, choices: dict) -> dict:
    """train_run, with a GPU out of memory as one clear error."""
    try:
        return train_run(cfg, run_dir, resume_dir, choices)
    except QtrainError:
        raise
    except torch.cuda.OutOfMemoryError as e:
        raise QtrainError(f"The GPU ran out of memory ({e}). Try a smaller data.batch_size.") from None


#: what each worker of ``devices=N`` runs (the launcher is given it: it does not import this module)
WORKER_JOB = launcher.Job(on_start=quit_on_signals_outside_training, train=train_job)


def _devices(cfg: DictConfig, ranks) -> int:
    """devices as a number (auto: every visible GPU), written back into cfg; under torchrun, the
    number of processes torchrun started."""
    given = cfg.get("devices", 1)
    try:
        devices = launcher.resolve_devices(given, str(cfg.device))
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
