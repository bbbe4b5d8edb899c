"""Which earlier run a run continues (``resume=true | <run dir>``), and how a run is recognised: its
*identity* (the config as far as it changes what the run computes, with the dataset's content
identity) and that identity's hash, the *fingerprint*, which every run folder keeps in fingerprint.txt.
A resumed run must have the same identity; a different one is refused, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qtrain.data import dataset_identity
from qtrain.errors import ConfigError
from qtrain.keys import DATA_SOURCE_KEYS, NEUTRAL, SAME_RESULT_KEYS, VOLATILE, first_spelling
from qtrain.run.lifecycle import check_writable
from qtrain.run.float_start import effective_pretrain
from qtrain.store import checkpoint

log = logging.getLogger("qtrain")

FINGERPRINT_FILE = "fingerprint.txt"  # in each run directory: what resume=true matches on
def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes what a run computes (of :func:`identity`)."""
    return identity_hash(identity(cfg))


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg: DictConfig) -> dict:
    """The config as far as it changes what a run computes, with the dataset's content identity."""
    c = first_spelling(OmegaConf.to_container(cfg, resolve=True))  # a target that moved keeps its fingerprint
    if "pretrain" in c:  # by what it does to the float start: an entry that pins the run's own value is left out
        c["pretrain"] = effective_pretrain(cfg)
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
    for key in DATA_SOURCE_KEYS:
        c.get("data", {}).pop(key, None)
    for dotted in SAME_RESULT_KEYS:
        node, leaf = c, dotted.split(".")
        for part in leaf[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf[-1], None)
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


def choose_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict | None]:
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
            resume_state(resume_dir, identity(cfg))  # names the differing keys
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
    check_writable(resume_dir, "resume=true" if cfg.resume is True else f"resume={cfg.resume}")
    return resume_dir, None


def resume_state(run_dir: Path, ident: dict) -> dict:
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
