"""MoE telemetry plots as MLflow artifacts, regenerated at every checkpoint and at the end of training
(the expert-load-by-source heatmap of a mixture: at every validation).

The rendering is moeplat.track.plots (plain numbers, no torch); this callback feeds it the MoE
telemetry the LMSystem logs (LMSystem.moe_telemetry, every train.moe_log_every steps) and uploads
the PNGs under plots/. Rank 0 only: the other ranks neither keep history nor draw.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from moeplat.track.plots import TelemetryHistory, render
from moeplat.track.specialization_plot import render_specialization

log = logging.getLogger(__name__)


class MoEPlots(L.Callback):
    def __init__(self, tracked, out_dir: str | Path, max_points: int = 256):
        """`tracked`: the run's moeplat.track.mlflow_run.TrackedRun (None: files only)."""
        self.tracked = tracked
        self.out_dir = Path(out_dir)
        self.history = TelemetryHistory(max_points)
        self._last_step: int | None = None  # step of the last telemetry recorded
        self._drawn_at: int | None = None  # step of the last plots drawn
        self._sources_at: int | None = None  # step of the last expert-load-by-source heatmap
        self.renders = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        telemetry = getattr(pl_module, "moe_telemetry", None)
        if trainer.is_global_zero and telemetry is not None and telemetry[0] != self._last_step:
            self._last_step = telemetry[0]
            self.history.add(*telemetry)

    def on_validation_end(self, trainer, pl_module) -> None:
        """A validation split by source (a mixture) draws plots/specialization.png at once: the
        expert load per source and each layer's specialisation (moeplat.track.specialization_plot)."""
        found = getattr(pl_module, "val_source_load", None)
        if not trainer.is_global_zero or found is None or found.step == self._sources_at:
            return
        self._sources_at = found.step
        try:
            path = render_specialization(
                found.names, found.layers, found.counts_SLE, found.scores, found.step, self.out_dir
            )
            if self.tracked is not None:
                self.tracked.log_artifact(str(path), "plots")
        except Exception:
            log.warning(
                "could not draw the expert specialisation heatmap at step %d", found.step, exc_info=True
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.draw(trainer.global_step, trainer.is_global_zero)

    def on_train_end(self, trainer, pl_module) -> None:
        self.draw(trainer.global_step, trainer.is_global_zero)

    def draw(self, step: int, is_global_zero: bool = True) -> None:
        """Render and upload, once per step (a checkpoint and last.ckpt at the same step draw once).
        A failure to draw is logged, never fatal: plots must not cost a training run."""
        if not is_global_zero or step == self._drawn_at or not len(self.history):
            return
        self._drawn_at = step
        try:
            files = render(self.history, self.out_dir)
            if self.tracked is not None and files:
                self.tracked.log_artifacts(str(self.out_dir), "plots")
            self.renders += 1
        except Exception:
            log.warning("could not draw the MoE telemetry plots at step %d", step, exc_info=True)
