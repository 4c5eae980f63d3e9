"""Train every (variant, seed) a set of findings needs, once: a run already finished in the
tracking store under the same key (variant, seed, quick, spec hash) is reused, so an interrupted
`moeplat repro` continues where it stopped and a second finding that needs the same variant costs
nothing. Every run goes to one MLflow experiment, tagged with its variant and seed."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from moeplat.repro.findings import QUICK, QUICK_DENSE, VARIANTS, Variant

EXPERIMENT, QUICK_EXPERIMENT = "repro", "repro-quick"
KEY_TAG = "moeplat.repro.key"
TAIL = 0.2  # telemetry figures: the mean over the last 20% of logged steps (one step is noisy)
FIGURES = ("moe/all/maxvio", "moe/all/experts_per_token", "moe/specialization")


@dataclass
class Record:
    variant: str
    seed: int
    run_id: str
    figures: dict[str, float]  # val/loss, val/bpb and the FIGURES the run logged


def spec_path(spec: str) -> Path:
    """A repository spec (specs/...): from the working directory, else from the source tree."""
    here = Path(spec)
    return here if here.is_file() else Path(__file__).resolve().parents[2] / spec


def overrides(v: Variant, seed: int, quick: bool, experiment: str) -> list[str]:
    sets = [*v.overrides, f"train.seed={seed}", f"tracking.experiment={experiment}"]
    sets += ["tracking.system_metrics=false", "tracking.log_model=false"]
    if quick:
        sets += [*QUICK, *v.quick_data, *(QUICK_DENSE if v.name == "dense" else ())]
    return sets


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(
    pairs: list[tuple[str, int]],
    *,
    quick: bool,
    tracking_uri: str,
    runs_root: Path,
    jobs: int = 1,
    log=_stderr,
) -> dict[tuple[str, int], Record]:
    """The record of each (variant, seed). The key of a run is its resolved spec, not the
    variant's name: two variants that resolve to the same spec (a learning-rate sweep point equal
    to the spec file's own rate) share one run. With `jobs` > 1 the missing runs train `jobs` at a
    time, each in its own process with the CPU threads split between them (small models use 2 cores
    better as 2 runs than as one)."""
    from moeplat.spec import load_spec

    experiment = QUICK_EXPERIMENT if quick else EXPERIMENT
    run_ids, missing, wanted = {}, {}, {}  # by key: finished run id, or what trains it
    for name, seed in pairs:
        v = VARIANTS[name]
        sets = overrides(v, seed, quick, experiment)
        key = f"seed={seed}|quick={quick}|{load_spec(spec_path(v.spec), sets).spec_hash}"
        wanted[name, seed] = key
        if key not in missing and key not in run_ids:
            found = _finished(tracking_uri, key)
            if found:
                run_ids[key] = found
            else:
                missing[key] = (v.spec, sets, key, name, seed)
    if jobs <= 1:
        for key, job in missing.items():
            run_ids[key] = _train(*job, tracking_uri, runs_root, log)
    else:
        run_ids.update(_train_parallel(missing, jobs, tracking_uri, experiment, runs_root, log))
    figures = {key: _figures(tracking_uri, run_id) for key, run_id in run_ids.items()}
    return {(n, s): Record(n, s, run_ids[key], figures[key]) for (n, s), key in wanted.items()}


def _train_parallel(
    missing: dict, jobs: int, tracking_uri: str, experiment: str, runs_root: Path, log
) -> dict[str, str]:
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from moeplat.track.spool import ensure_experiment

    if missing:  # a new SQLite store: its schema migrated here, not by two children at once
        ensure_experiment(tracking_uri, experiment)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")  # no forked torch / MLflow state in the children
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_child, initargs=(threads,)) as pool:
        futures = {
            key: pool.submit(_train, *job, tracking_uri, runs_root, log) for key, job in missing.items()
        }
        return {key: future.result() for key, future in futures.items()}


def _child(threads: int) -> None:
    """A spawned training process: its share of the threads, and the CLI's quiet libraries."""
    import torch

    from moeplat.train.quiet import quiet_libraries, quiet_lightning

    torch.set_num_threads(threads)
    quiet_libraries()
    quiet_lightning()


def _finished(tracking_uri: str, key: str) -> str | None:
    from moeplat.track.query import runs_by_tag

    done = [r for r in runs_by_tag(tracking_uri, KEY_TAG, key) if r.get("status") == "FINISHED"]
    return done[0]["run_id"] if done else None


def _train(spec, sets, key, name, seed, tracking_uri, runs_root, log) -> str:
    from moeplat.spec import load_spec
    from moeplat.train.run import run

    loaded = load_spec(spec_path(spec), sets)
    log(f"repro: training {name} seed {seed} ({loaded.spec.train.max_steps} steps)")
    result = run(loaded, runs_root=runs_root, tracking_uri=tracking_uri, progress=False, tags={KEY_TAG: key})
    return result.run_id


def _figures(tracking_uri: str, run_id: str) -> dict[str, float]:
    from moeplat.track.query import metric_history

    hist = metric_history(tracking_uri, run_id, ["val/loss", "val/bpb", *FIGURES])
    figures = {k: h[-1][1] for k, h in hist.items() if k.startswith("val/") and h}
    for k in FIGURES:
        values = [v for _, v in hist[k] if v is not None]
        if values:
            tail = values[-max(1, round(len(values) * TAIL)) :]
            figures[k] = statistics.fmean(tail)
    return figures
