"""One run from start to end: pick what to resume (qtrain.resume), build the objects (qtrain.build),
train them (train.fit) under the run's lock and signals (qtrain.lifecycle), and write result.json.

Also owns ``init=float``: the float model of the same architecture and recipe, trained once per
seed and recipe, cached under ``<out_dir>/float/`` and shared by every cell that starts from it.
The two ways a run starts from an earlier one:
  init   = path of a checkpoint (weights only), or "float" (above);
  resume = true (the latest run with the same config) or a run directory: continue that run in its
           own directory, to the same result an uninterrupted run would reach (a finished run is
           left as it is and its result returned, so re-running a sweep with resume=true is safe).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain import checkpoint, record
from qtrain.build import build, check_init_file, load_init, pick_device, seed_everything
from qtrain.errors import ConfigError, Diverged, Interrupted, QtrainError
from qtrain.float_start import float_config
from qtrain.keys import short_name
from qtrain.lifecycle import (
    LogAlsoInto,
    RunLock,
    StopSignals,
    quit_on_signals_outside_training,
    remove_stale_temporaries,
)
from qtrain.parallel import launcher
from qtrain.parallel.ranks import REPEAT_WINDOW_S, current_ranks, device_of
from qtrain.resume import FINGERPRINT_FILE, choose_resume, fingerprint, identity, identity_hash, resume_state
from qtrain.schedule import scale_schedule
from qtrain.summary import distinct_values, format_summary, model_summary
from qtrain.train import DivergenceWatch, NonFinite, fit
from qtrain.validate import validate

log = logging.getLogger("qtrain")


# ---------------------------------------------------------------------------------------------
# init=float: the cached float model a quantized run starts from
# ---------------------------------------------------------------------------------------------


def float_run_dir(cfg: DictConfig, key: str) -> Path:
    """Where init=float caches the float model of ``cfg`` (``key``: the fingerprint of its float_config),
    named by the float model's own seed (``pretrain.seed`` may keep it apart from the run's)."""
    return Path(cfg.out_dir).resolve() / "float" / f"{short_name(cfg.data)}_" \
        f"{short_name(cfg.model).lower()}_s{float_config(cfg).seed}_{key}"


def float_checkpoint(cfg: DictConfig) -> Path:
    """Path of the cached float checkpoint for ``cfg``; trains it first when missing."""
    ranks = current_ranks()
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


def float_start_record(ckpt: Path) -> dict:
    """result.json's ``float_start`` of a run that started from the cached float model ``ckpt``: which
    float run, at what schedule, and how good it was (qtrain-report shows it beside the cell)."""
    run_dir = Path(ckpt).parent.parent
    r = json.loads((run_dir / "result.json").read_text())
    return {"run_dir": str(run_dir), "fingerprint": (run_dir / FINGERPRINT_FILE).read_text().strip(),
            "epochs": r.get("epochs"), "schedule_scale": r.get("schedule_scale", 1),
            "unscaled_epochs": r.get("unscaled_epochs"), "final_test_acc": r.get("final_test_acc"),
            "best_test_acc": r.get("best_test_acc"), "best_epoch": r.get("best_epoch")}


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
    ranks = current_ranks()
    validate(cfg)
    code = record.code_identity()  # now, not at the end: the checkout may change while a run trains
    run_dir = Path(resume_dir if resume_dir is not None else run_dir)
    device = device_of(ranks, pick_device(cfg.device))
    ident = ranks.decide(identity, cfg)  # of the config as given (schedule_scale included, not yet applied)
    fp = identity_hash(ident)  # (not fingerprint(cfg): that would hash the dataset's files a second time)
    # the float model gets the same schedule_scale, applied to the float recipe
    if cfg.init not in (None, "float"):
        check_init_file(str(cfg.init))
    init_path = str(float_checkpoint(cfg)) if cfg.init == "float" else cfg.init
    given, cfg = cfg, scale_schedule(cfg)
    seed_everything(cfg.seed)
    with ranks.main_only(RunLock(run_dir)), ranks.main_only(LogAlsoInto(run_dir)):
        for tmp in remove_stale_temporaries(run_dir) if ranks.is_main else ():
            log.info("removed %s, a temporary file left by a process that died", tmp)
        return _train_locked(cfg, given, run_dir, resume_dir, init_path, device, ident, fp, code, choices, ranks)





def _train_locked(cfg, given, run_dir, resume_dir, init_path, device, ident, fp, code, choices, ranks) -> dict:
    data, model, method, optimizer, scheduler, task, names = build(cfg, device)
    if init_path:
        load_init(model, init_path)
    summary = model_summary(model, names, cfg.wbits, cfg.abits, data.input_shape)
    log.info("model summary\n%s", format_summary(summary))

    start_epoch, best, elapsed_before, partial = 0, None, 0.0, None
    if resume_dir is not None and checkpoint.has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        state = resume_state(run_dir, ident)
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

    if ranks.is_main:  # rank 0 alone writes (qtrain/parallel/ranks.py)
        (run_dir / FINGERPRINT_FILE).write_text(fp + "\n")
        done_steps = start_epoch * len(data.train) + (partial["batches"] if partial else 0)
        recorder = record.Recorder(run_dir, checkpoint_state, start_epoch, best, start_step=done_steps)
        recorder.log_config(resolved, overrides_of(run_dir))
    else:
        recorder = record.NullRecorder()
    watch = DivergenceWatch(model.named_parameters(), device, ranks=ranks)
    try:
        with StopSignals(repeat_window=REPEAT_WINDOW_S if ranks.world > 1 else 0) as stop:
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
            "method": short_name(resolved["method"]), "model": short_name(resolved["model"]),
            "data": short_name(resolved["data"]), "lr": resolved["optim"].get("lr")}
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
        "devices": current_ranks().world,
        "sync_bn": bool(cfg.get("sync_bn", False)) and current_ranks().world > 1,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **code,
        "init": init_path,
        **({"float_start": float_start_record(Path(init_path))} if given.init == "float" else {}),
        "choices": choices or {},
        "paper": resolved.get("paper"),
        "model_summary": summary,
        "run_dir": str(run_dir),
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
