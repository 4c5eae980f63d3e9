"""train.eval: lm-evaluation-harness tasks at the end of a run; include_path is found relative to the
spec file that sets it, and must be there when the spec is read from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.cli.main import main
from moeplat.errors import SpecError
from moeplat.spec import load_spec, validate

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def _spec(tmp_path: Path, eval_yaml: str) -> Path:
    sub = tmp_path / "specs"
    sub.mkdir(exist_ok=True)
    f = sub / "s.yaml"
    f.write_text(f"extends: {TINY}\ntrain:\n  eval: {eval_yaml}\n")
    return f


def test_include_path_resolves_against_the_spec_file(tmp_path, monkeypatch):
    (tmp_path / "specs" / "my-tasks").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # not where the spec is
    loaded = load_spec(_spec(tmp_path, "{tasks: [a, b], include_path: my-tasks, num_fewshot: 0}"))
    ev = loaded.spec.train.eval
    assert ev.tasks == ["a", "b"] and ev.num_fewshot == 0 and ev.limit is None
    assert ev.include_dir == str((tmp_path / "specs" / "my-tasks").resolve())
    # read back from a run's stored spec (no file): kept as written, not looked for here
    assert validate(loaded.resolved).train.eval.include_dir == "my-tasks"
    assert load_spec(TINY).spec.train.eval is None  # off by default


def test_a_missing_include_path_and_bad_task_names_are_spec_errors(tmp_path, capsys):
    f = _spec(tmp_path, '{tasks: [" arc", "a,b", x, x], include_path: nowhere}')
    with pytest.raises(SpecError) as e:
        load_spec(f)
    text = str(e.value)
    assert "train.eval.include_path" in text and "nowhere is not a directory" in text
    assert "train.eval.tasks.0" in text and "train.eval.tasks.1" in text and "names a task twice" in text
    assert main(["validate", str(f)]) == 2
    assert "train.eval.include_path" in capsys.readouterr().err
    with pytest.raises(SpecError, match=r"train\.eval\.tasks"):
        load_spec(_spec(tmp_path, "{tasks: []}"))
    with pytest.raises(SpecError, match=r"train\.eval\.limit"):
        load_spec(_spec(tmp_path, "{tasks: [a], limit: 0}"))


def test_num_fewshot_and_limit_at_and_past_their_bounds(tmp_path):
    """The spec bound probe cannot place train.eval (it needs task names), so its numbers are here."""
    ev = load_spec(_spec(tmp_path, "{tasks: [a], num_fewshot: 0, limit: 1}")).spec.train.eval
    assert ev.num_fewshot == 0 and ev.limit == 1
    with pytest.raises(SpecError, match=r"train\.eval\.num_fewshot"):
        load_spec(_spec(tmp_path, "{tasks: [a], num_fewshot: -1}"))
