"""Training callbacks that are ours (Lightning provides checkpointing and the progress bar)."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Tokens per second and learning rate, measured over the last `every` optimizer steps.

    Wall time between optimizer steps includes data loading, forward, backward and the optimizer;
    validation time is excluded (the window restarts after each validation).
    """

    def __init__(self, tokens_per_step: int, every: int):
        self.tokens_per_step = tokens_per_step
        self.every = every
        self._t0: float | None = None
        self._step0 = 0
        self.tokens_per_s: float | None = None

    def _restart(self, trainer) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._restart(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps < self.every:
            return
        elapsed = time.perf_counter() - self._t0
        self.tokens_per_s = steps * self.tokens_per_step / elapsed
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        pl_module.log_dict({"perf/tokens_per_s": self.tokens_per_s, "train/lr": lr})
        self._restart(trainer)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover from that."""


class FiniteLoss(L.Callback):
    """Stop at the first non-finite training loss with a clear reason, instead of training on NaN."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss is {float(loss)} at step {trainer.global_step}: lower train.optimizer.lr, "
                "set train.grad_clip, or check the data"
            )
