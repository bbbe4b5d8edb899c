"""The runs committed under results/ are still recognised by the current code: composing each one's
overrides gives the fingerprint in its fingerprint.txt, so `resume=true` (and the campaign script, which
skips finished cells that way) finds it instead of training it again. A config or identity change that
would orphan them fails here."""

from pathlib import Path

import pytest
import yaml

from qtrain.run.resume import FINGERPRINT_FILE, fingerprint

from .conftest import ROOT, real_data_root

RUNS = sorted(p.parent for p in (ROOT / "results").rglob(FINGERPRINT_FILE)
              if (p.parent / "overrides.yaml").exists())  # (a cached float model keeps no overrides)


def test_there_are_committed_runs_to_check():
    assert len(RUNS) >= 10


@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_a_committed_run_keeps_its_fingerprint(make_cfg, run: Path):
    root = real_data_root()
    if root is None or not (Path(root) / "cifar10.npz").is_file():
        pytest.skip("the fingerprint includes the dataset's identity: needs the real data (QTRAIN_DATA)")
    overrides = yaml.safe_load((run / "overrides.yaml").read_text())
    cfg = make_cfg(*overrides, f"data.root={root}")  # (where the data lives is not part of the identity)
    assert fingerprint(cfg) == (run / FINGERPRINT_FILE).read_text().strip()
