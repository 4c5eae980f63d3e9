"""Run by tests/sweep/test_pruning_ddp.py in a subprocess: 2 CPU processes (gloo) under DDP,
a trial that wants to prune at the first validation. Each rank writes rank<N>.json (its final step)."""

from __future__ import annotations

import atexit
import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from moeplat.sweep.pruning import PruneOnValidation


class Trial:
    """Stands in for optuna.Trial; records who asked, in a file per process."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir

    def _note(self, what: str) -> None:
        with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
            f.write(what + "\n")

    def report(self, value: float, step: int) -> None:
        self._note(f"report {step}")

    def should_prune(self) -> bool:
        self._note("should_prune")
        return True


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y), sync_dist=True)

    def setup(self, stage):
        # Lightning registers destroy_process_group at exit for NCCL only; a gloo group left to
        # interpreter finalization can abort the process ("terminate called without an active
        # exception", pytorch/pytorch#190489), so every rank destroys it while Python is alive.
        atexit.register(_destroy_process_group)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Report(L.Callback):
    def __init__(self, log_dir: str):
        self.log_dir = log_dir

    def on_fit_end(self, trainer, pl_module):
        with open(os.path.join(self.log_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rank": trainer.global_rank, "step": trainer.global_step}, f)


def main(log_dir: str) -> None:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=40,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PruneOnValidation(Trial(log_dir)), Report(log_dir)],
    )
    trainer.fit(Tiny(), loader, loader)


if __name__ == "__main__":
    main(sys.argv[1])
