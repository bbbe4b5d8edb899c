"""Check a composed config before anything is read or trained: every value that cannot work is one
:class:`ConfigError` paragraph naming the key (exit 2), never a traceback mid-run and never a run
that silently does something else.

Hydra already rejects unknown keys and group options; this module checks the *values*, and names the keys
that a ``+key=value`` override adds but nothing reads (:func:`check_added_keys`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from qtrain.errors import ConfigError
from qtrain.keys import CONFIG_DIR, short_name
from qtrain.quant.act import check_impl
from qtrain.quant.rules import QUANT_LAYER_RULES
from qtrain.quant.weight import WQUANT_RULES
from qtrain.run.schedule import check_scale

log = logging.getLogger("qtrain")

MAX_ABITS = 16  # 2^16 - 1 levels: the level index stays exact in float32, the staircase meaningful
MAX_WBITS = 8   # the exact k-bit projection sorts n * (2^(k-1) - 1) breakpoints per layer per step
MAX_SEED = 2**31 - 1
AUGMENTS = {"mnist": (None, "crop_flip"), "cifar10": (None, "crop_flip"), "cifar100": (None, "crop_flip"),
            "imagenet": (None, "standard"), "idx": (None, "crop_flip"), "npz": (None, "crop_flip")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bits(cfg, key, limit):
    v = cfg.get(key)
    if v is not None and (not _is_int(v) or not 1 <= v <= limit):
        raise ConfigError(f"{key} must be an integer from 1 to {limit} (bits), or null for float, got {v!r}."
                          + (" The exact k-bit weight projection's cost grows with 2^(k-1); 8 bits is its limit."
                             if key == "wbits" else ""))


def _bool(value, key):
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")


def _positive_int(value, key, allow_null=False):
    if (value is None and allow_null) or (_is_int(value) and value >= 1):
        return
    raise ConfigError(f"{key} must be a positive integer{' or null' if allow_null else ''}, got {value!r}.")


def _validate_optim(optim: DictConfig) -> None:
    lr = optim.get("lr")
    if lr is not None and (not _is_number(lr) or not math.isfinite(lr) or lr <= 0):
        raise ConfigError(f"optim.lr must be a positive finite number, got {lr!r}.")
    for key, lo, hi in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf)):
        v = optim.get(key)
        if v is not None and (not _is_number(v) or not lo <= v <= hi):
            raise ConfigError(f"optim.{key} must be a number in [{lo}, {hi}], got {v!r}.")


def _validate_sched(sched: DictConfig, epochs: int) -> None:
    if sched.get("interval", "epoch") not in ("epoch", "step"):
        raise ConfigError(f"sched.interval must be epoch or step, got {sched.get('interval')!r}.")
    if "milestones" in sched:
        m = sched.milestones
        if not isinstance(m, (list, ListConfig)) or not all(_is_int(x) and x >= 1 for x in m) \
                or list(m) != sorted(set(m)):
            raise ConfigError(f"sched.milestones must be a list of increasing positive epoch numbers, e.g. "
                              f"[80,140], got {m!r}.")
    gamma = sched.get("gamma")
    if gamma is not None and (not _is_number(gamma) or not 0 < gamma < math.inf):
        raise ConfigError(f"sched.gamma must be a positive number (the factor the lr is multiplied by), got {gamma!r}.")


def _validate_act(act: DictConfig) -> None:
    check_impl(act.get("impl", "reference"))
    for key in ("learn_alpha", "share_block_alpha"):
        _bool(act.get(key), f"act.{key}")
    clamp = act.get("alpha_clamp")
    if not isinstance(clamp, (list, ListConfig)) or len(clamp) != 2 or not all(_is_number(c) for c in clamp) \
            or not 0 < clamp[0] < clamp[1]:
        raise ConfigError(f"act.alpha_clamp must be [low, high] with 0 < low < high, got {clamp!r}.")
    for key in ("alpha_grad_scale", "alpha_grad_clip"):
        v = act.get(key)
        if not _is_number(v) or v <= 0:
            raise ConfigError(f"act.{key} must be a positive number, got {v!r}.")


def _validate_devices(cfg: DictConfig) -> None:
    devices = cfg.get("devices", 1)
    if devices != "auto" and not (_is_int(devices) and devices >= 1):
        raise ConfigError(f"devices must be a number of devices (1, 2, ...) or auto, got {devices!r}.")
    timeout = cfg.get("collective_timeout_s", 600)
    if not _is_number(timeout) or not 0 < timeout < math.inf:
        raise ConfigError(f"collective_timeout_s must be a positive number of seconds, got {timeout!r}.")
    batch = cfg.data.get("batch_size")
    if _is_int(devices) and devices > 1 and _is_int(batch) and batch % devices:
        raise ConfigError(f"data.batch_size={batch} does not divide over devices={devices}: the batch size is the "
                          f"global batch (each device takes batch_size / devices). Use a multiple of {devices}.")


def check_proxy(fn, name: str) -> None:
    """A proxy STE mu must map a tensor to a tensor of the same shape and be non-decreasing
    ([CG]'s class of monotone proxies): checked on a grid, before training."""
    x = torch.linspace(-6, 6, 2001)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # e.g. builtins.print would print the grid
            y = fn(x.clone())
    except Exception as e:
        raise ConfigError(f"ste.fn={name} cannot be used as a proxy mu(x): calling it on a tensor failed "
                          f"({type(e).__name__}: {e}).") from None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        raise ConfigError(f"ste.fn={name} must map a float tensor to a float tensor of the same shape "
                          f"(it returned {type(y).__name__}).")
    if not bool(torch.isfinite(y).all()) or bool((y.diff() < -1e-6).any()):
        raise ConfigError(f"ste.fn={name} is not a monotone non-decreasing function on [-6, 6]; an STE proxy must "
                          "be (e.g. torch.nn.functional.softplus, torch.sigmoid, torch.tanh).")


def validate(cfg: DictConfig, warn: bool = True) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be given (the config leaves {'it' if len(missing) == 1 else 'them'}"
                          f" to you), e.g. {missing[0]}=<value> on the command line.")
    _bits(cfg, "abits", MAX_ABITS)
    _bits(cfg, "wbits", MAX_WBITS)
    _positive_int(cfg.epochs, "epochs")
    _positive_int(cfg.get("stop_after_epoch"), "stop_after_epoch", allow_null=True)
    seed = cfg.seed
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}.")
    check_scale(cfg.get("schedule_scale", 1))
    pre_scale = (cfg.get("pretrain") or {}).get("schedule_scale")
    if pre_scale is not None:
        try:
            check_scale(pre_scale)
        except ConfigError as e:
            raise ConfigError(f"pretrain.{e}") from None
    every = cfg.get("log_every_n_steps", 0)
    if not _is_int(every) or every < 0:
        raise ConfigError(f"log_every_n_steps must be an integer >= 0 (0 = off), got {every!r}.")
    for key in ("progress", "compile", "channels_last", "sync_bn"):
        _bool(cfg.get(key, False), key)
    _validate_devices(cfg)
    if not isinstance(cfg.device, str) or (cfg.device not in ("auto", "cpu", "cuda")
                                           and not cfg.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}.")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {cfg.precision!r}.")
    if cfg.wquant not in WQUANT_RULES:
        raise ConfigError(f"wquant must be one of {', '.join(WQUANT_RULES)}, got {cfg.wquant!r}.")
    if cfg.quant_layers not in QUANT_LAYER_RULES:
        raise ConfigError(f"quant_layers must be one of {', '.join(QUANT_LAYER_RULES)}, got {cfg.quant_layers!r}.")
    data = cfg.data
    for key in ("limit_train", "limit_test"):
        _positive_int(data.get(key), f"data.{key}", allow_null=True)
    for key in ("batch_size", "test_batch_size"):
        _positive_int(data.get(key), f"data.{key}")
    name = short_name(data)
    if name in AUGMENTS and data.get("augment") not in AUGMENTS[name]:
        choices = ", ".join("null" if a is None else a for a in AUGMENTS[name])
        raise ConfigError(f"data.augment must be one of {choices} for {name}, got {data.get('augment')!r}.")
    _validate_optim(cfg.optim)
    _validate_sched(cfg.sched, cfg.epochs)
    _validate_act(cfg.act)
    phase2 = cfg.method.get("phase2_epoch")
    if phase2 is not None and not (_is_int(phase2) and phase2 >= 0):
        raise ConfigError(f"method.phase2_epoch must be an epoch number >= 0, got {phase2!r}.")
    if warn and _is_int(phase2) and phase2 >= cfg.epochs:
        log.warning("method.phase2_epoch=%d but the run has %d epochs: BinaryRelax's phase II (u = Q(w)) never "
                    "starts, so the whole run trains the relaxed weights", phase2, cfg.epochs)


# ---------------------------------------------------------------------------------------------
# Keys added on the command line (+key=value) that nothing reads
# ---------------------------------------------------------------------------------------------

#: nodes whose keys are the user's own: qtrain reads what they hold, whatever it is
FREE_NODES = ("pretrain", "paper", "hydra")
#: nodes passed whole to a constructor (_target_): a key it does not take fails there, with its name
CONSTRUCTOR_NODES = ("data", "model", "method", "optim", "sched", "ste")


def _known_keys() -> tuple[set[str], set[str]]:
    """(top-level keys, act.* keys) of configs/config.yaml, and the config groups."""
    top = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    groups = {next(iter(d)) for d in top["defaults"] if isinstance(d, dict)}
    return set(top) - {"defaults"} | groups, set(top.get("act") or {})


def check_added_keys(overrides: list[str]) -> list[str]:
    """The keys that ``+key=value`` / ``++key=value`` overrides add and no part of qtrain reads: a
    ConfigError when one is clearly a typo of a known key ("+epoch: did you mean epochs?"), else one
    warning line each (returned, for the caller to log before training). Hydra itself refuses a
    plain ``key=value`` whose key does not exist, so only added keys can go unread."""
    top, act = _known_keys()
    unread = []
    for o in overrides:
        if not o.startswith("+") or "=" not in o:
            continue
        key = o.lstrip("+").split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head in FREE_NODES or head in CONSTRUCTOR_NODES:
            continue
        known = act if head == "act" and rest else top
        name = rest.split(".")[0] if head == "act" and rest else head
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        prefix = "act." if known is act else ""
        if close:
            raise ConfigError(f"+{key}: did you mean {prefix}{close[0]}? No part of qtrain reads {key}; give "
                              f"{prefix}{close[0]}=... (without +) to set the key qtrain has.")
        unread.append(f"+{key}: no part of qtrain reads this key, so it changes nothing in training (it is still "
                      "part of the run's config and fingerprint). Known top-level keys: qtrain --help.")
    return unread
