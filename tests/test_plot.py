"""``savepoint plot``: the PNG of a resumed run, the saves and resumes it marks, and bad input."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from conftest import make_config, run_cli

from savepoint.plot import find_events, read_records, segments
from savepoint.train import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(dump, stop_after=None):
    trainer = Trainer(make_config(dump, "--training.steps", "4", "--checkpoint.interval", "2"))
    try:
        trainer.train(stop_after=stop_after)
    finally:
        trainer.metrics.close()
        if trainer.checkpointer.lock is not None:
            trainer.checkpointer.lock.release()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 4-step job (saves every 2 steps) stopped after step 3, then resumed from step 2 to the end."""
    dump = tmp_path_factory.mktemp("plot") / "run"
    _train(dump, stop_after=3)
    _train(dump)
    return dump


def test_plot_of_a_resumed_run_is_a_png_with_its_saves_and_resume(resumed_run, capsys, tmp_path):
    records = read_records(resumed_run)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]  # step 3 again after the resume from 2
    # a save is noted in the next record written; the resume in the first record after it
    assert (records[2]["saved_steps"], records[3]["resumed_from"]) == ([2], 2)
    out = tmp_path / "out.png"
    code, stdout, stderr = run_cli(["plot", str(resumed_run), "-o", str(out)], capsys)
    assert (code, stderr) == (0, "")
    assert "2 committed save(s), 1 resume(s) marked" in stdout
    assert out.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert find_events(records, [2, 4]) == ([2, 4], [2])


def test_default_output_is_in_the_dump_folder(resumed_run, capsys):
    code, _, _ = run_cli(["plot", str(resumed_run)], capsys)
    assert code == 0 and (resumed_run / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_find_events_uses_markers_then_repeated_steps():
    marked = [{"step": 1}, {"step": 2, "saved_steps": [2]}, {"step": 3}, {"step": 5, "resumed_from": 4}]
    assert find_events(marked, [4]) == ([2, 4], [4])  # a resume past the log's end has its marker
    unmarked = [{"step": s} for s in (1, 2, 3, 4, 5, 3, 4, 5, 6)]  # an older log: no markers
    assert find_events(unmarked, [2, 4, 6]) == ([2, 4, 6], [2])
    assert find_events(unmarked, []) == ([], [2])  # no saves known: the step before the repeated one
    assert [[r["step"] for r in run] for run in segments(unmarked)] == [[1, 2, 3, 4, 5], [3, 4, 5, 6]]


def _error(argv, capsys) -> str:
    code, _, stderr = run_cli(argv, capsys)
    assert code == 1 and stderr.count("\n") == 1, stderr
    return stderr


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert "is not a folder" in _error(["plot", str(tmp_path / "missing")], capsys)
    assert "metrics.jsonl does not exist" in _error(["plot", str(tmp_path)], capsys)
    good = json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n{{not json\n{good}\n")
    assert "metrics.jsonl line 2 is not a step record" in _error(["plot", str(tmp_path)], capsys)
    assert "one DUMP_FOLDER, got 2" in _error(["plot", "a", "b"], capsys)
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n")
    assert "choose another -o path" in _error(["plot", str(tmp_path), "-o", str(tmp_path / "no" / "x.png")], capsys)


def test_a_torn_last_line_is_left_out(tmp_path):
    good = json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3})
    (tmp_path / "metrics.jsonl").write_text(f'{good}\n{{"step": 2, "lo')
    assert [r["step"] for r in read_records(tmp_path)] == [1]
