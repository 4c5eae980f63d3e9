"""Validation of a freshly built model (step 0, seed 0 weights) on a spec's validation data: the
tests of validation by data and of per-source metrics compare what it scores."""

from __future__ import annotations

import torch

from moeplat.compile.data import build_data


def validate_at_step0(loaded) -> tuple[dict, object]:
    """(the LMSystem's last_val, the DataModule) after one validation pass on one CPU process."""
    import lightning as L

    from moeplat.compile.model import build_model
    from moeplat.train.system import LMSystem

    dm, _ = build_data(loaded.spec, loaded.base_dir)
    torch.manual_seed(0)  # the same weights for every caller: step 0, before any training
    system = LMSystem(build_model(loaded.spec), configure=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(system, datamodule=dm, verbose=False)
    return system.last_val, dm
