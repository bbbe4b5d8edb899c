"""The float model a quantized run starts from (``init=float``): its config, and which of the run's
``pretrain`` overrides actually change it (float_cache.py keeps and trains it).

The float model is the run's own config with float weights and activations and the plain float
method, plus the experiment's ``pretrain`` overrides (e.g. the STE cells train at lr 0.01 from a
float model trained at lr 0.1). ``pretrain.schedule_scale`` gives the float model its own schedule
(1: the full recipe under a cell run at ``schedule_scale=0.1``); left null, it is the cell's, and
``pretrain.seed`` keeps one float model under several seeds of the quantized phase. float_cache.py trains and caches it; resume.py names a run by what it computes.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict


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
    return OmegaConf.merge(f, pretrain_overrides(cfg))


def pretrain_overrides(cfg: DictConfig) -> DictConfig:
    """``cfg.pretrain`` as overrides of the float config: ``schedule_scale: null`` (the default) means
    "the cell's own scale", so it is no override at all."""
    given = cfg.get("pretrain")
    pre = OmegaConf.create(OmegaConf.to_container(given, resolve=True) if given else {})
    if "schedule_scale" in pre and pre.schedule_scale is None:
        del pre["schedule_scale"]
    return pre


def effective_pretrain(cfg: DictConfig) -> dict:
    """``cfg.pretrain`` without the entries that leave the float model as it is, such as
    ``optim: {lr: 0.1}`` on a run that trains at lr 0.1 itself.

    Such an entry pins the float recipe against later command-line overrides (with it,
    ``optim.lr=0.01`` changes the quantized training only), so an experiment may add one; left out
    of a run's identity, it does not orphan the runs made before it was added."""
    pre = OmegaConf.to_container(cfg.pretrain, resolve=True) if cfg.get("pretrain") else {}
    target = _plain(float_config(cfg))

    def without_noops(node: dict) -> None:
        for key in list(node):
            if isinstance(node[key], dict):
                without_noops(node[key])
                if not node[key]:  # merging an empty mapping changes nothing
                    del node[key]
                continue
            value = node.pop(key)
            if _plain(float_config(_with_pretrain(cfg, pre))) != target:  # it mattered: put it back
                node[key] = value

    without_noops(pre)
    return pre


def _with_pretrain(cfg: DictConfig, pretrain: dict) -> DictConfig:
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.pretrain = pretrain
    return c


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
