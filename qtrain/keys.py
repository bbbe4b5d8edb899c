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

#: keys that do not change what a run computes (left out of its fingerprint)
VOLATILE = ("resume", "progress", "device", "stop_after_epoch", "out_dir", "paper", "objective",
            "log_every_n_steps", "collective_timeout_s")

#: (dotted) keys whose default leaves a run's computation as it was before the key existed: at
#: that value they are left out of the fingerprint, so adding such a key never orphans earlier runs.
#: Every key added to the config from now on belongs here with its neutral value.
NEUTRAL = {"schedule_scale": 1, "sched.interval": "epoch", "devices": 1, "sync_bn": False}


def short_name(target) -> str:
    """The last part of a ``_target_`` (a config node's, or the string itself): what names it to people."""
    if not isinstance(target, str):
        target = (target or {}).get("_target_", "")
    return str(target).rsplit(".", 1)[-1]
