"""train.checkpoint.keep: each value leaves different files in the run directory; every value has a
last.ckpt during the run (resumable after a crash); the commands that need a checkpoint of a run
that kept none say so and name the setting."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from moeplat.cli.main import main
from moeplat.compile.checkpoints import STATE_KEY
from moeplat.compile.trainer import checkpoint_callbacks
from moeplat.compile.upcycle import resolve_checkpoint
from moeplat.errors import SpecError
from moeplat.evaluate.load import ModelNotFound, load_trained
from moeplat.spec import load_spec
from moeplat.train.run import run

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
# 6 steps, a validation at 2, 4 and 6
SHORT = ["train.max_steps=6", "train.val_every=2", "train.schedule.warmup_steps=1", "data.val_tokens=128"]
OFF = [*SHORT, "tracking.enabled=false"]


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from more threads; on a shared machine they slow it down."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LastDuringRun(L.Callback):
    """Whether checkpoints/last.ckpt existed when training finished (before the run's end)."""

    def __init__(self):
        self.seen = None

    def on_fit_end(self, trainer, pl_module):
        self.seen = (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").is_file()


def _files(run_dir: str) -> list[str]:
    d = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _run(*overrides: str):
    probe = LastDuringRun()
    result = run(load_spec(TINY, [*OFF, *overrides]), progress=False, callbacks=(probe,))
    assert probe.seen, "every keep value writes last.ckpt during the run"
    return result


def test_writers_per_keep_value(tmp_path):
    def writers(*overrides):
        cbs = checkpoint_callbacks(load_spec(TINY, list(overrides)).spec, tmp_path)
        return [(cb.monitor, cb._every_n_train_steps, cb.save_top_k, bool(cb.save_last)) for cb in cbs]

    assert writers() == [("val/loss", 0, 1, True)]  # null: as before
    assert writers("train.checkpoint_every=3") == [(None, 3, -1, True)]
    assert writers("train.checkpoint.keep=last") == [("val/loss", 0, 0, True)]
    assert writers("train.checkpoint.keep=none", "train.checkpoint_every=3") == [(None, 3, 0, True)]
    assert writers("train.checkpoint.keep=all") == [("val/loss", 0, -1, True)]
    assert writers("train.checkpoint.keep=best") == [("val/loss", 0, 1, True)]
    # best with checkpoint_every: the best is judged at validations, last.ckpt every 3 steps
    assert writers("train.checkpoint.keep=best", "train.checkpoint_every=3") == [
        ("val/loss", 0, 1, False),
        (None, 3, 0, True),
    ]


def test_an_unknown_keep_value_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        load_spec(TINY, ["train.checkpoint.keep=latest"])
    assert [i.path for i in err.value.issues] == ["train.checkpoint.keep"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["best-step*", "last.ckpt"]),  # the default, as before
        (["train.checkpoint.keep=last"], ["last.ckpt"]),
        (["train.checkpoint.keep=best"], ["best-step*"]),
        (
            ["train.checkpoint.keep=all"],
            ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"],
        ),
        (["train.checkpoint.keep=none"], []),
        (["train.checkpoint.keep=best", "train.checkpoint_every=3"], ["best-step*"]),
        (
            ["train.checkpoint.keep=all", "train.checkpoint_every=3"],
            ["last.ckpt", "step000003.ckpt", "step000006.ckpt"],
        ),
    ],
)
def test_keep_decides_the_files_left_after_the_run(workdir, one_thread, overrides, expected):
    result = _run(*overrides)
    files = _files(result.run_dir)
    assert [f if not f.startswith("best-step") else "best-step*" for f in files] == expected
    if not expected:  # none: not even an empty checkpoints/ directory
        assert not (Path(result.run_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_a_keep_none_run_names_the_setting_to_resume_export_or_upcycle_it(workdir, one_thread, capsys):
    result = _run("train.checkpoint.keep=none")
    run_dir = Path(result.run_dir)
    assert json.loads((run_dir / "run.json").read_text())[STATE_KEY] == "none"

    with pytest.raises(SpecError) as err:
        run(load_spec(TINY, [*OFF, "train.checkpoint.keep=none"]), resume=str(run_dir), progress=False)
    assert err.value.issues[0].path == "train.checkpoint.keep"
    assert "kept no checkpoint" in str(err.value) and "train.checkpoint.keep: last" in str(err.value)

    args = ["run", str(TINY), "--no-progress", "--resume", str(run_dir)]
    assert main([*args, *[a for o in OFF for a in ("--set", o)]]) == 2
    assert "kept no checkpoint" in capsys.readouterr().err

    with pytest.raises(ModelNotFound, match=r"kept no checkpoint .*train.checkpoint.keep: last"):
        load_trained(str(run_dir))
    assert main(["export", str(run_dir), "-o", str(workdir / "out"), "--format", "safetensors"]) == 2
    assert "kept no checkpoint" in capsys.readouterr().err

    for ref in (run_dir, run_dir.parent):  # the run directory, or the spec's directory of runs
        with pytest.raises(SpecError, match="kept no checkpoint") as err:
            resolve_checkpoint(str(ref))
        assert err.value.issues[0].path == "train.init.checkpoint"


@pytest.mark.slow
def test_a_keep_best_run_loads_its_best_checkpoint_and_refuses_resume(workdir, one_thread):
    result = _run("train.checkpoint.keep=best")
    (best,) = Path(result.run_dir, "checkpoints").glob("best-step*.ckpt")
    loaded = load_trained(result.run_dir)
    assert loaded.source == str(best) and loaded.meta["step"] == int(best.stem.removeprefix("best-step"))
    with pytest.raises(SpecError, match="kept only its best checkpoint"):
        run(load_spec(TINY, [*OFF, "train.checkpoint.keep=best"]), resume=result.run_dir, progress=False)
