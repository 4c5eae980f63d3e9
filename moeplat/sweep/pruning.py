"""Report validation loss to the Optuna trial at every validation and stop pruned trials."""

from __future__ import annotations

import lightning as L
import optuna


class PruneOnValidation(L.Callback):
    """After each validation: report `monitor` at the current optimizer step; if the pruner says so,
    stop training. Under several processes only rank 0 talks to the study; its decision is
    broadcast so every rank stops at the same step and none waits forever in a collective."""

    def __init__(self, trial: optuna.Trial | None, monitor: str = "val/loss"):
        self.trial, self.monitor = trial, monitor
        self.pruned_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self.trial.report(float(value), step=trainer.global_step)
                prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_step = trainer.global_step
            trainer.should_stop = True
