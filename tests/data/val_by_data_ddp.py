"""Validate the tiny spec's freshly initialised model on 1 or more CPU processes (gloo): run by
tests/data/test_val_by_data.py under `python -m torch.distributed.run --nproc-per-node W`.

Writes OUT/rank<r>.json: the logged validation metrics and the tokens this rank scored itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def main(out: str, *overrides: str) -> None:
    import lightning as L
    import torch

    from moeplat.compile.data import build_data
    from moeplat.compile.model import build_model
    from moeplat.spec import load_spec
    from moeplat.train.system import LMSystem

    loaded = load_spec(TINY, list(overrides))
    dm, _ = build_data(loaded.spec, loaded.base_dir)
    torch.manual_seed(0)  # the same initial weights in every process
    system = LMSystem(build_model(loaded.spec), configure=None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(system, datamodule=dm, verbose=False)
    local_tokens = sum(sums[1] for sums in system._val_sums.values())
    result = {"metrics": system.last_val, "local_tokens": local_tokens, "world": trainer.world_size}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
