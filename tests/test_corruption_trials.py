"""Corruption trials: random bit flips and truncations of a committed step are always caught.

The default run has 50 trials; the full campaign (the figure the README quotes) is marked ``slow``:
``./run_tests.sh -m slow tests/test_corruption_trials.py``.
"""

from __future__ import annotations

import pytest

from savepoint.durable import DCP_MARKER, MANIFEST
from tests.trials import corruption as ct


@pytest.mark.parametrize(("trials", "seed"), [
    pytest.param(50, 6, id="50-trials"),
    pytest.param(1000, 0, id="1000-trials", marks=pytest.mark.slow),
])
def test_every_corruption_is_detected(tmp_path, trials, seed):
    summary = ct.run_trials(trials, seed=seed, workdir=tmp_path)
    assert len(summary.results) == trials
    kinds = {r.damage.kind for r in summary.results}
    files = {r.damage.file for r in summary.results}
    assert kinds == {"flip", "truncate"}
    assert {DCP_MARKER, MANIFEST} <= files and any(f.endswith(".distcp") for f in files)
    assert summary.counts() == {"verify": trials, "cli": trials, "load": trials, "fallback": trials}, summary.report()
