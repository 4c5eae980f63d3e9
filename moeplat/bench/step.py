"""Whole-step overhead: the same model, optimizer and batches trained by a plain PyTorch loop, by
moeplat's Lightning system without tracking, and with MLflow tracking (a throwaway sqlite store);
and the wall time of `moeplat validate` as a fresh process (what a user waits for).

The first `warmup` optimizer steps of each are excluded; the figure is the mean time per step over
the next `steps`, measured from the first measured batch's start to the last one's end, so
Lightning's work between batches (hooks, logging, progress) is inside it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeplat.compile.data import build_data
from moeplat.compile.model import build_model
from moeplat.compile.optim import build_optimizer, build_scheduler, build_update_schedule
from moeplat.spec import load_spec


def _spec(spec_file: str, steps: int, warmup: int):
    total = steps + warmup
    overrides = [f"train.max_steps={total}", f"train.val_every={total + 1}", "parallel.accelerator=cpu"]
    overrides.append("train.schedule={kind: constant}")  # a warm-up longer than the bench is an error
    return load_spec(spec_file, overrides)


def plain_loop(spec, datamodule, steps: int, warmup: int) -> float:
    """Seconds per step of the textbook loop: forward, (loss + aux).backward(), clip, step."""
    torch.manual_seed(spec.train.seed)
    model = build_model(spec).train()
    opt = build_optimizer(spec.train, model)
    sched = build_scheduler(spec.train, opt)
    batches = iter(datamodule.train_dataloader())
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(batches)
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        if spec.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def lightning_loop(spec, datamodule, steps: int, warmup: int, tracked: bool) -> float:
    """Seconds per step of moeplat's LMSystem under a Lightning Trainer (as `moeplat run`)."""
    import lightning as L

    from moeplat.compile.trainer import trainer_kwargs
    from moeplat.train.system import LMSystem

    marks: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            marks["end"] = time.perf_counter()

    torch.manual_seed(spec.train.seed)
    model = build_model(spec)
    system = LMSystem(
        model,
        lambda m: (opt := build_optimizer(spec.train, m), build_scheduler(spec.train, opt)),
        log_every=spec.train.log_every,
        updates=build_update_schedule(spec.train, model),
    )
    with tempfile.TemporaryDirectory() as tmp:
        logger, run = False, None
        if tracked:
            from moeplat.track.logger import BatchedMLflowLogger
            from moeplat.track.mlflow_run import TrackedRun

            run = TrackedRun(f"sqlite:///{tmp}/mlflow.db", "bench", "overhead")
            logger = BatchedMLflowLogger(run)
        kw = {**trainer_kwargs(spec), "limit_val_batches": 0, "enable_checkpointing": False}
        trainer = L.Trainer(
            **kw, logger=logger, callbacks=[Clock()], enable_progress_bar=False, default_root_dir=tmp
        )
        trainer.fit(system, datamodule=datamodule)
        if run is not None:
            trainer.logger.flush()
            run.finish("FINISHED")
    return (marks["end"] - marks["start"]) / steps


def step_overhead(spec_file: str, steps: int = 60, warmup: int = 3, rounds: int = 3) -> dict[str, float]:
    """Seconds per step of the three loops, interleaved round by round (plain, lightning, tracked,
    plain, ...); each loop's fastest round is its figure (the noise floor: these machines are
    shared, and one slow round of 20 steps would otherwise read as overhead)."""
    loaded = _spec(spec_file, steps, warmup)
    datamodule, _ = build_data(loaded.spec, loaded.base_dir)
    datamodule.setup("fit")
    times: dict[str, list[float]] = {"plain": [], "lightning": [], "tracked": []}
    for _ in range(rounds):
        times["plain"].append(plain_loop(loaded.spec, datamodule, steps, warmup))
        times["lightning"].append(lightning_loop(loaded.spec, datamodule, steps, warmup, tracked=False))
        times["tracked"].append(lightning_loop(loaded.spec, datamodule, steps, warmup, tracked=True))
    plain, light, tracked = (min(times[k]) for k in ("plain", "lightning", "tracked"))
    return {
        "plain_s_per_step": plain,
        "lightning_s_per_step": light,
        "tracked_s_per_step": tracked,
        "lightning_overhead": light / plain - 1,
        "tracking_overhead": tracked / light - 1,
    }


def validate_wall_s(spec_file: str, repeats: int = 3) -> float:
    """Median wall time of `python -m moeplat.cli.main validate SPEC` in a fresh process."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "moeplat.cli.main", "validate", str(Path(spec_file))],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
