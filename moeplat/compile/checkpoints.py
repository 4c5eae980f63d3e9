"""What train.checkpoint.keep leaves in a run directory, and how readers find (or miss) it.

During a run every value of `keep` writes checkpoints/last.ckpt (moeplat.compile.trainer), so a
crash or a kill stays resumable. At the successful end, `keep: best` and `keep: none` delete it
(none leaves no checkpoints/ directory at all) and the run's run.json records `checkpoint_keep`:
--resume, eval, generate, export and upcycling from that run then say why there is no checkpoint
and which setting to change, rather than "file not found".
"""

from __future__ import annotations

import json
from pathlib import Path

STATE_KEY = "checkpoint_keep"  # in run.json, written when the end of a run deleted last.ckpt
LAST = "last.ckpt"


def remove_unkept(checkpoints: Path, keep: str | None) -> bool:
    """After a successful run: delete what `keep` does not keep; whether anything was deleted."""
    if keep not in ("best", "none"):
        return False
    (checkpoints / LAST).unlink(missing_ok=True)
    if keep == "none" and checkpoints.is_dir():
        for leftover in checkpoints.glob("*.ckpt"):  # none writes only last.ckpt; a resumed run's older files
            leftover.unlink()
        if not any(checkpoints.iterdir()):
            checkpoints.rmdir()
    return True


def kept_setting(run_dir: Path) -> str | None:
    """The train.checkpoint.keep that deleted run_dir's last.ckpt at its end, or None."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get(STATE_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def run_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint standing for a run directory's model: checkpoints/last.ckpt, or for a run
    that kept only its best (keep: best), the best file."""
    ckpts = Path(run_dir) / "checkpoints"
    if (ckpts / LAST).is_file():
        return ckpts / LAST
    if kept_setting(run_dir) == "best":
        best = sorted(ckpts.glob("best-step*.ckpt"))
        if best:
            return best[-1]
    return None


def no_checkpoint_message(run_dir: Path, need: str = "a checkpoint") -> str | None:
    """Why run_dir has no checkpoint when its run deleted them on purpose (None otherwise)."""
    keep = kept_setting(run_dir)
    if keep == "none":
        return (
            f"the run {run_dir} kept no checkpoint (train.checkpoint.keep: none; sweep trials default to "
            f"it), and {need} is needed: run it again with train.checkpoint.keep: last (or best, all; "
            "in a sweep, under `overrides:`)"
        )
    if keep == "best":
        return (
            f"the run {run_dir} kept only its best checkpoint (train.checkpoint.keep: best), and {need} "
            "is needed: run it again with train.checkpoint.keep: last (or all)"
        )
    return None
