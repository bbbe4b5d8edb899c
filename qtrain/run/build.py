"""Build a run's objects from its config: device, data, model (with its activation quantizers),
method, optimizer, LR scheduler and task, and load the weights a run starts from (``init=<path>``).
Nothing here trains; :mod:`qtrain.run.runner` puts these objects to work.
"""

from __future__ import annotations

import os
import pydoc
import random
from dataclasses import dataclass

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qtrain.errors import ConfigError, QtrainError
from qtrain.keys import short_name
from qtrain.methods import Method
from qtrain.parallel.ranks import current_ranks
from qtrain.quant.act import ActLayer, resolve_alpha
from qtrain.quant.rules import quantized_weight_names
from qtrain.quant.weight import make_weight_quantizer
from qtrain.run.validate import check_proxy
from qtrain.store import checkpoint
from qtrain.train.loop import Classification, Regression


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
                    alpha_clamp=tuple(a.alpha_clamp), share_block_alpha=a.share_block_alpha, proxy=proxy,
                    impl=a.get("impl", "reference"))


def instantiate_node(node, **kwargs):
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
    model_name, data_name = short_name(cfg.model), short_name(cfg.data)
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


@dataclass
class Built:
    """A run's objects, as :func:`build` makes them from its config (nothing trained yet).
    ``quantized``: the names of the weights the method quantizes."""

    data: object
    model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: object
    task: Classification | Regression
    quantized: list[str]


def build(cfg: DictConfig, device: torch.device) -> Built:
    """The data, model, method, optimizer, scheduler and task for ``cfg``."""
    data = instantiate_node(cfg.data, seed=cfg.seed, device=device)
    current_ranks().shard(data)  # a data-parallel run: this rank's share of each batch
    # _partial_: Hydra would turn the ActLayer dataclass into a config if passed to instantiate.
    make_model = instantiate_node(cfg.model, _partial_=True, num_classes=data.num_classes, input_shape=data.input_shape)
    model = fitted_model(make_model, build_act_layer(cfg), data.input_shape, cfg).to(device)
    if cfg.channels_last:  # faster on CUDA and on this CPU too (docs/BENCHMARKS.md); float rounding only
        model = model.to(memory_format=torch.channels_last)
    quantizer = make_weight_quantizer(cfg.wbits, cfg.wquant)
    names = quantized_weight_names(model, cfg.quant_layers) if quantizer else []
    method = instantiate_node(cfg.method)
    method.attach(model, quantizer, names)
    try:
        optimizer = instantiate(cfg.optim)(model.parameters())
    except (TypeError, ValueError, InstantiationException) as e:
        cause = e.__cause__ or e
        raise ConfigError(f"optim: {cfg.optim._target_} cannot be built from the optim settings: {cause}. Pick an "
                          "optimizer config (optim=sgd | adam) or remove keys it does not take, e.g. "
                          "~optim.momentum.") from None
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    task = Regression() if data.task == "regression" else Classification()
    return Built(data, model, method, optimizer, scheduler, task, names)


INIT_HINT = "Give the path of a qtrain checkpoint (…/checkpoints/last.pt) or init=float."


def check_init_file(path: str) -> None:
    """Before any data is read: the init checkpoint at least exists."""
    if not os.path.isfile(path):
        raise ConfigError(f"init={path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}. "
                          f"{INIT_HINT}")


def load_init(model, path: str) -> dict | None:
    """Weights (and batch-norm statistics) from a checkpoint; activation alphas keep their values. Returns the
    config of the run that wrote the checkpoint (None for a bare state dict)."""
    hint = INIT_HINT
    check_init_file(path)
    full, why = checkpoint.problem(path)
    if full is None:
        raise ConfigError(f"init={path}: the file is {why}. {hint}")
    state = full.get("model", full)
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
    config = full.get("config") if "model" in full else None
    return config if isinstance(config, dict) else None


def replayed_draws(cfg, start_config: dict | None) -> str | None:
    """A warning where a run that starts from another run's checkpoint will see that run's own batches: every
    epoch's order, crops and flips come from (seed, epoch) alone (qtrain.data.loaders), so with the same seed and
    data, epoch e replays the start's epoch e, and the start fits some epochs' draws better than others (those it
    met at a high learning rate). A run that barely moves its weights then logs that pattern as its training loss
    ([STE] §4.2: steps of a few hundredths at the start's lr milestones). None where the draws differ."""
    if not start_config or start_config.get("seed") != cfg.seed:
        return None
    data = start_config.get("data") or {}
    if short_name(data) != short_name(cfg.data) or data.get("limit_train") != cfg.data.get("limit_train"):
        return None
    return (f"init={cfg.init}: that run had the same seed ({cfg.seed}) and data, so this run sees its batches again, "
            "epoch by epoch, and its per-epoch training loss carries how well the start fits each epoch's draw. Read "
            "that loss against the start model's on the same draws (scripts/epoch_draw_loss.py measure <this run's "
            "overrides> --epochs 1-N), or give another seed= for fresh draws; the test numbers are not affected.")
