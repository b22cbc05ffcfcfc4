"""Corruption trials in CI: random bit flips and truncations of a committed step are always caught."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _harness():
    spec = importlib.util.spec_from_file_location("corruption_trials", ROOT / "benchmarks" / "corruption_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_corruption_is_detected(tmp_path):
    ct = _harness()
    summary = ct.run_trials(50, seed=6, workdir=tmp_path)
    assert len(summary.results) == 50
    kinds = {r.damage.kind for r in summary.results}
    files = {r.damage.file for r in summary.results}
    assert kinds == {"flip", "truncate"}
    assert {".metadata", "manifest.json"} <= files and any(f.endswith(".distcp") for f in files)
    assert summary.counts() == {"verify": 50, "cli": 50, "load": 50, "fallback": 50}, summary.report()
