"""What qtrain knows about config keys and ``_target_`` names, in one place (no torch: qtrain-report
reads it too).

- :data:`VOLATILE`: keys that do not change what a run computes, left out of its fingerprint (and
  kept by qtrain-report in the row of the run's cell).
- :data:`NEUTRAL`: keys added after runs were made, with the value that computes what those runs
  computed; at that value a key is left out of the fingerprint, so adding it never orphans them.
- :func:`short_name`: ``qtrain.models.resnet.resnet20`` -> ``resnet20``, as run folders, tables
  and messages name a target.
"""

from __future__ import annotations

from pathlib import Path

#: the checkout qtrain runs from (it is installed from one: `pip install -e .`), and its configs/
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

#: keys that do not change what a run computes (left out of its fingerprint)
VOLATILE = ("resume", "progress", "device", "stop_after_epoch", "out_dir", "paper", "objective",
            "log_every_n_steps", "collective_timeout_s")

#: (dotted) keys whose default leaves a run's computation as it was before the key existed: at
#: that value they are left out of the fingerprint, so adding such a key never orphans earlier runs.
#: Every key added to the config from now on belongs here with its neutral value.
NEUTRAL = {"schedule_scale": 1, "sched.interval": "epoch", "devices": 1, "sync_bn": False}

#: dotted keys that choose *how* something is computed, never *what*: implementations that give bitwise the
#: same results (tests/test_compact.py, tests/test_fused.py), left out of the fingerprint whatever their value
SAME_RESULT_KEYS = ("act.impl",)

#: ``data.*`` keys that say where a dataset is, or where it is fetched from, not what it is: left out of
#: the fingerprint, which holds the dataset's content identity instead (qtrain.data.dataset_identity)
DATA_SOURCE_KEYS = ("root", "download", "mirrors", "url")


def short_name(target) -> str:
    """The last part of a ``_target_`` (a config node's, or the string itself): what names it to people."""
    if not isinstance(target, str):
        target = (target or {}).get("_target_", "")
    return str(target).rsplit(".", 1)[-1]


#: ``_target_``s that moved when the package was restructured: as first released -> where they are now.
#: A run's fingerprint spells a target the first way (resume.identity), so a run made before the move
#: is still found by resume=true; build.py instantiates the second, so an old checkpoint's config
#: still builds (qtrain-eval, qtrain-export). Add a line here whenever a target moves again.
MOVED_TARGETS = {
    "qtrain.data_generic.idx": "qtrain.data.idx",
    "qtrain.data_generic.npz": "qtrain.data.npz",
    "qtrain.data_imagenet.imagenet": "qtrain.data.imagenet",
    "qtrain.schedulers.cosine_with_warmup": "qtrain.train.schedulers.cosine_with_warmup",
}
_FIRST_SPELLING = {new: old for old, new in MOVED_TARGETS.items()}


def _retarget(node, table: dict):
    if isinstance(node, dict):
        return {k: (table.get(v, v) if k == "_target_" and isinstance(v, str) else _retarget(v, table))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v, table) for v in node]
    return node


def first_spelling(container: dict) -> dict:
    """A (resolved, plain) config with every moved ``_target_`` spelled as first released."""
    return _retarget(container, _FIRST_SPELLING)


def current_spelling(container: dict) -> dict:
    """A (resolved, plain) config with every moved ``_target_`` spelled where it is now."""
    return _retarget(container, MOVED_TARGETS)
