"""`moeplat run`: one spec -> one Lightning fit -> one MLflow run, resumable from its run directory."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue
from moeplat.parallel.launch import RUN_DIR_ENV  # one run directory for every rank of a multi-process run
from moeplat.spec import LoadedSpec
from moeplat.spec.moe import resolve_dispatch
from moeplat.spec.plan import plan
from moeplat.track.spool import SPOOL_FILE

METRICS_JOURNAL = "metrics-journal.jsonl"  # every metric row, for an exact history on resume

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: str
    run_id: str | None
    tracking_uri: str | None
    steps: int
    val_loss: float | None
    unigram_baseline: float
    tokens_per_s: float | None
    wall_s: float
    val_bpb: float | None = None  # bits per UTF-8 byte: comparable across tokenizers
    unigram_baseline_bpb: float | None = None
    rank: int = 0  # this process's global rank in a multi-process run


def run_name(loaded: LoadedSpec) -> str:
    spec = loaded.spec
    moe = spec.model.moe
    overrides = "".join(f" {o}" for o in loaded.overrides)
    return spec.tracking.run_name.format(
        name=spec.name,
        overrides=overrides,
        router=moe.router.kind if moe else "dense",
        top_k=moe.top_k if moe else 0,
        num_experts=moe.num_experts if moe else 0,
    )


def run_tags(loaded: LoadedSpec) -> dict[str, object]:
    spec, moe = loaded.spec, loaded.spec.model.moe
    return {
        "moeplat.spec_name": spec.name,
        "moeplat.spec_hash": loaded.spec_hash,
        "moeplat.router": moe.router.kind if moe else "dense",
        "moeplat.experts": f"{moe.num_experts}x{moe.experts.kind}" if moe else "dense",
        "moeplat.top_k": moe.top_k if moe else 0,
        "moeplat.dispatch": resolve_dispatch(moe, spec.train.compile) if moe else "none",
        "moeplat.compile": spec.train.compile,
        "moeplat.strategy": spec.parallel.strategy.kind,
        "moeplat.devices": spec.parallel.world_size,
        "moeplat.accelerator": spec.parallel.accelerator,
    }


def _resume_dir(resume: str, runs_root: Path, name: str) -> Path:
    if resume == "last":
        candidates = sorted((runs_root / name).glob("*/run.json"))
        if not candidates:
            raise SpecError(
                SpecIssue("", f"--resume last: no earlier run of '{name}' under {runs_root / name}")
            )
        return candidates[-1].parent
    path = Path(resume)
    if not (path / "run.json").is_file():
        raise SpecError(
            SpecIssue(
                "", f"--resume {resume}: not a run directory (no run.json); pass a path under {runs_root}"
            )
        )
    return path


def _open_run_dir(loaded: LoadedSpec, runs_root: Path, resume: str | None) -> tuple[Path, dict]:
    """A fresh timestamped run directory, or the one being resumed with its saved state; the
    directory named by $MOEPLAT_RUN_DIR when a launcher (or rank 0) chose it for every rank."""
    shared = os.environ.get(RUN_DIR_ENV)
    if shared:
        run_dir = Path(shared)
        run_dir.mkdir(parents=True, exist_ok=True)
        state_file = run_dir / "run.json"
        return run_dir, json.loads(state_file.read_text()) if state_file.is_file() else {}
    if not resume:
        run_dir = runs_root / loaded.spec.name / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir.mkdir(parents=True)
        return run_dir, {}
    run_dir = _resume_dir(resume, runs_root, loaded.spec.name)
    state = json.loads((run_dir / "run.json").read_text())
    if state.get("spec_hash") != loaded.spec_hash:
        log.warning(
            "resuming with a spec that differs from the original run (hash %s vs %s)",
            loaded.spec_hash,
            state.get("spec_hash"),
        )
    return run_dir, state


def _start_tracking(
    loaded: LoadedSpec,
    state: dict,
    cli_uri: str | None,
    counts,
    corpus,
    tags: dict,
    spool: Path | None = None,
):
    """One MLflow run per run directory: created on the first start, continued on --resume.
    `tags` may carry mlflow.parentRunId: a sweep trial is a child of its sweep's run. Resumed, the
    run gets `tags` again (the trial that now continues it). Writes the
    server cannot take go to the `spool` file (moeplat.track.spool) until it is back."""
    from moeplat.track.mlflow_run import TrackedRun, log_spec, resolve_tracking_uri

    spec = loaded.spec
    if not spec.tracking.enabled:
        return None
    uri = state.get("tracking_uri") or resolve_tracking_uri(cli_uri, spec.tracking.uri)
    tracked = TrackedRun(
        uri, spec.tracking.experiment, run_name(loaded), run_id=state.get("run_id"), spool=spool
    )
    if not state.get("run_id"):
        log_spec(tracked, loaded.resolved, loaded.files, loaded.overrides, {**run_tags(loaded), **tags})
        tracked.log_params(
            {
                "plan.total_params": counts.total_params,
                "plan.active_params": counts.active_params,
                "plan.flops_per_token_train": counts.flops_per_token_train,
                "moe.dispatch": run_tags(loaded)["moeplat.dispatch"],  # auto's choice, resolved
                **corpus.as_params(),
            }
        )
    elif tags:  # a sweep trial's retry continues the run of the trial it retries: now it is its run
        tracked.set_tags(tags)
    if spec.tracking.system_metrics:
        tracked.start_system_metrics(spec.tracking.system_metrics_every_s, resume=bool(state.get("run_id")))
    return tracked


def _save_state(run_dir: Path, loaded: LoadedSpec, tracked, metrics_through: dict | None = None) -> None:
    """run.json; `metrics_through`: per metric, the last step an attempt that ended by itself sent
    beyond its last checkpoint (moeplat.track.logger): a resumed attempt does not log them again."""
    state = {
        "run_id": tracked.run_id if tracked else None,
        "tracking_uri": tracked.tracking_uri if tracked else None,
        "spec_hash": loaded.spec_hash,
        "spec_files": loaded.files,
        "overrides": loaded.overrides,
        "metrics_through": metrics_through or {},
    }
    _write_state(run_dir, state)


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "run.json.tmp"  # replaced in one step: a kill never leaves half a run.json
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / "run.json")


def _record_metrics_through(run_dir: Path, through: dict[str, int]) -> None:
    state = json.loads((run_dir / "run.json").read_text())
    recorded = dict(state.get("metrics_through") or {})
    for key, step in through.items():
        recorded[key] = max(step, recorded.get(key, step))
    _write_state(run_dir, {**state, "metrics_through": recorded})


def run(
    loaded: LoadedSpec,
    *,
    runs_root: str | Path = "runs",
    resume: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    callbacks: tuple = (),
    tags: dict | None = None,
    end_tags: dict[str, dict] | None = None,
    final_eval=None,
) -> RunResult:
    """Train `loaded` and track it. `callbacks` are extra Lightning callbacks (a sweep's pruner);
    `tags` are extra MLflow tags for a new run; `end_tags` maps a final MLflow status (FINISHED,
    FAILED, KILLED) to tags set just before the run is closed with it. A failure's message is
    kept in the tag moeplat.error. `final_eval` runs train.eval's tasks (moeplat.train.final_eval).

    Several devices: every rank runs this function (started by Lightning's launcher, torchrun or
    srun); they share one run directory ($MOEPLAT_RUN_DIR, set here by rank 0 for the ranks it
    starts) and only rank 0 talks to MLflow (moeplat.parallel.launch)."""
    from moeplat.compile.trainer import check_trainable
    from moeplat.parallel.launch import launch_rank, local_launch_problem, rank_logs, share_run_dir
    from moeplat.train.host_memory import keep_heap_memory
    from moeplat.train.interrupt import interrupts_recorded

    t_start = time.perf_counter()
    check_trainable(loaded.spec)
    keep_heap_memory()  # each step's activations reuse the last step's memory (~15% on CPU)
    problem = local_launch_problem(loaded.spec.parallel.world_size)
    if problem:
        raise SpecError([SpecIssue("parallel.devices", problem)])
    rank = launch_rank(loaded.spec.parallel.devices)
    run_dir, state = _open_run_dir(loaded, Path(runs_root), resume)
    _check_resumable(run_dir, resume)
    world = loaded.spec.parallel.world_size
    # interrupts_recorded: a Ctrl-C swallowed anywhere in here is raised at the next batch
    with share_run_dir(run_dir, rank, world), rank_logs(run_dir, rank, world), interrupts_recorded():
        opts = dict(resume=resume, tracking_uri=tracking_uri, progress=progress, callbacks=callbacks)
        opts["final_eval"] = final_eval
        return _run(loaded, run_dir, state, rank, t_start, tags=tags, end_tags=end_tags, **opts)


def _run(
    loaded,
    run_dir,
    state,
    rank,
    t_start,
    *,
    resume,
    tracking_uri,
    progress,
    callbacks,
    tags,
    end_tags,
    final_eval,
):
    import lightning as L

    from moeplat.compile.data import build_data
    from moeplat.compile.hf_init import init_from_hf
    from moeplat.compile.model import build_model, compile_model
    from moeplat.compile.optim import build_optimizer, build_scheduler, build_update_schedule
    from moeplat.compile.upcycle import upcycle_from_spec
    from moeplat.train.callbacks import FiniteLoss, ResumeMetrics, Throughput
    from moeplat.train.final_eval import run_final_eval
    from moeplat.train.interrupt import InterruptGuard
    from moeplat.train.plots import MoEPlots
    from moeplat.train.run_artifacts import log_model, log_summary, save_tokenizer
    from moeplat.train.samples import samples_callback
    from moeplat.train.system import LMSystem

    spec, train = loaded.spec, loaded.spec.train
    L.seed_everything(train.seed, workers=True, verbose=False)
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    resuming = bool(resume) and last_ckpt.exists()
    model = build_model(spec)  # draws from its own seeded RNG: the order here changes nothing
    if not resuming:  # train.init; a resumed run's weights come from its own checkpoint
        upcycle_from_spec(spec, model) or init_from_hf(spec, model)
    compile_model(spec, model)  # train.compile; after the weights are final, names unchanged
    datamodule, corpus = build_data(spec, loaded.base_dir)
    # train.samples: prompt lengths are checked here, before an MLflow run is created
    samples = samples_callback(spec, datamodule.tokenizer, run_dir / "samples")
    counts = plan(spec)
    # One MLflow run, on rank 0: the other ranks train and write their logs to run_dir/logs.
    spool = run_dir / SPOOL_FILE
    tracked = (
        _start_tracking(loaded, state, tracking_uri, counts, corpus, tags or {}, spool) if rank == 0 else None
    )
    if rank == 0:
        _save_state(run_dir, loaded, tracked, state.get("metrics_through"))
        save_tokenizer(datamodule, run_dir, tracked)

    system = LMSystem(
        model,
        lambda m: (opt := build_optimizer(train, m), build_scheduler(train, opt)),
        log_every=train.log_every,
        moe_log_every=train.moe_log_every,
        updates=build_update_schedule(train, model),
    )
    throughput = Throughput(
        counts.tokens_per_step,
        every=train.log_every,
        flops_per_token=counts.flops_per_token_train,
        peak_tflops=spec.tracking.peak_tflops,
        devices=spec.parallel.world_size,
    )
    guard = FiniteLoss()
    plots = [MoEPlots(tracked, run_dir / "plots")] if tracked and spec.model.moe else []
    if samples is not None:
        samples.tracked, plots = tracked, [*plots, samples]
    callbacks = [throughput, guard, InterruptGuard(), ResumeMetrics(), *plots, *callbacks]
    trainer = _trainer(loaded, run_dir, tracked, callbacks, progress and rank == 0, state)
    status, error = "FAILED", None
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=last_ckpt if resuming else None)
        if system.last_val.get("step") != trainer.global_step:
            trainer.validate(system, datamodule=datamodule, verbose=False)
        if spec.tracking.enabled and spec.tracking.log_model:
            log_model(trainer, system, tracked, loaded, run_dir)
        if spec.train.eval is not None:
            run_final_eval(trainer, loaded, datamodule, rank, final_eval)
        if rank == 0:
            _keep_checkpoints(run_dir, spec.train.checkpoint.keep)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning handles Ctrl-C itself, ignores SIGINT from then on and leaves with
        # sys.exit(1): it is still an interrupt, and the next Ctrl-C must work again.
        if isinstance(e, SystemExit) and not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = "KILLED"
        raise KeyboardInterrupt from None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:  # whatever happened, what was measured reaches MLflow and the run is closed
        if tracked:
            wall_s = time.perf_counter() - t_start
            log_summary(tracked, trainer.logger, corpus, trainer.global_step, wall_s, throughput)
            final_tags = dict((end_tags or {}).get(status, {}))
            if error:
                final_tags["moeplat.error"] = error[:5000]
            if final_tags:
                tracked.set_tags(final_tags)
            tracked.finish(status)
            if tracked.spool_pending():
                log.warning(
                    "tracking server unreachable: the rest of this run is in %s; "
                    "send it with `moeplat sync %s`",
                    spool,
                    run_dir,
                )
    return RunResult(
        run_dir=str(run_dir),
        run_id=tracked.run_id if tracked else None,
        tracking_uri=tracked.tracking_uri if tracked else None,
        steps=trainer.global_step,
        val_loss=system.last_val.get("val/loss"),
        unigram_baseline=corpus.unigram_baseline,
        tokens_per_s=throughput.tokens_per_s,
        wall_s=time.perf_counter() - t_start,
        rank=rank,
        val_bpb=system.last_val.get("val/bpb"),
        unigram_baseline_bpb=getattr(corpus, "unigram_baseline_bpb", None),
    )


def _trainer(loaded: LoadedSpec, run_dir: Path, tracked, callbacks: list, progress: bool, state: dict):
    import lightning as L

    from moeplat.compile.trainer import checkpoint_callbacks, trainer_kwargs
    from moeplat.track.logger import BatchedMLflowLogger

    progress_bar = [L.pytorch.callbacks.TQDMProgressBar(refresh_rate=5)] if progress else []
    strategy = None
    if loaded.spec.parallel.strategy.kind == "expert_parallel":  # shards the MoE layers at setup
        from moeplat.parallel.lightning import expert_parallel_strategy

        strategy = expert_parallel_strategy(loaded.spec)
    return L.Trainer(
        **trainer_kwargs(loaded.spec, strategy),
        logger=BatchedMLflowLogger(tracked, resumable=_resumable(run_dir, state)) if tracked else False,
        callbacks=[*callbacks, *checkpoint_callbacks(loaded.spec, run_dir / "checkpoints"), *progress_bar],
        enable_progress_bar=progress,
        default_root_dir=run_dir,
    )


def _check_resumable(run_dir: Path, resume: str | None) -> None:
    """--resume of a run whose successful end deleted last.ckpt (train.checkpoint.keep: best or
    none) would silently train again from step 0: say so instead."""
    from moeplat.compile.checkpoints import LAST, no_checkpoint_message

    message = no_checkpoint_message(run_dir, "last.ckpt") if resume else None
    if message and not (run_dir / "checkpoints" / LAST).exists():
        raise SpecError(SpecIssue("train.checkpoint.keep", f"--resume {resume}: {message}"))


def _keep_checkpoints(run_dir: Path, keep: str | None) -> None:
    """train.checkpoint.keep, once the run has ended well: delete what it does not keep, and say
    so in run.json for the commands that look for a checkpoint later."""
    from moeplat.compile.checkpoints import STATE_KEY, remove_unkept

    if remove_unkept(run_dir / "checkpoints", keep):
        state = json.loads((run_dir / "run.json").read_text())
        _write_state(run_dir, {**state, STATE_KEY: keep})


def _resumable(run_dir: Path, state: dict):
    """The logger holds each metric row until last.ckpt covers its step (moeplat.track.logger)."""
    from moeplat.track.logger import Resumable

    return Resumable(
        journal=run_dir / METRICS_JOURNAL,
        checkpoint=run_dir / "checkpoints" / "last.ckpt",
        skip_through=state.get("metrics_through") or {},
        on_uncovered=lambda through: _record_metrics_through(run_dir, through),
    )
