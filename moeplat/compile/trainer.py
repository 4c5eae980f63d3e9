"""Spec -> Lightning Trainer arguments and checkpointing. (The trainer itself is built in train/run.py.)"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from moeplat.spec.root import Spec


def trainer_kwargs(spec: Spec) -> dict:
    t, par = spec.train, spec.parallel
    assert par.strategy.kind == "single", par.strategy  # the only strategy of spec v1
    return {
        "strategy": "auto",  # one device: Lightning's single-device strategy
        "accelerator": par.accelerator,
        "devices": par.devices,
        "precision": t.precision,
        "max_steps": t.max_steps,
        "accumulate_grad_batches": t.grad_accum,
        "gradient_clip_val": t.grad_clip,
        # Lightning counts val_check_interval in micro-batches; the spec counts optimizer steps.
        "val_check_interval": t.val_every * t.grad_accum,
        "check_val_every_n_epoch": None,
        "limit_val_batches": t.val_batches,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": t.log_every,
        "enable_model_summary": False,
    }


def checkpoint_callback(spec: Spec, dirpath: Path) -> ModelCheckpoint:
    """checkpoint_every: N -> a checkpoint every N optimizer steps (all kept) plus last.ckpt;
    null -> at every validation, the best by val/loss plus last.ckpt."""
    every = spec.train.checkpoint_every
    common = {"dirpath": dirpath, "save_last": True, "auto_insert_metric_name": False}
    if every:
        return ModelCheckpoint(every_n_train_steps=every, save_top_k=-1, filename="step{step:06d}", **common)
    return ModelCheckpoint(monitor="val/loss", save_top_k=1, filename="best-step{step:06d}", **common)
