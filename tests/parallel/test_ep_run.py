"""Expert parallelism through `moeplat run` (moeplat.parallel.lightning): the tiny spec for 4 steps
on 2 CPU processes (gloo) with ep_size 2 -- each rank holds 2 of the 4 experts of every MoE layer,
tokens travel by all-to-all -- logs the same per-step training losses as 1 process with the
doubled batch, to float32 round-off, in ONE MLflow run with the per-rank expert load.

Unlike plain DDP (tests/parallel/test_ddp_equivalence.py) the Switch load-balancing loss stays on:
the balance losses are evaluated on the router outputs gathered over the world (balance_scope
"global"), so every rank's aux loss is the single-process one. The checkpoint and the model
artifact hold the full (single-process) layout: the run resumes on one device and on 2 EP ranks
to the same losses as the uninterrupted single-process run, and `moeplat eval` rebuilds the model
on one device and reproduces the run's last val/loss. A constant learning rate makes a 4-step run
the prefix of a 6-step one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import finish, mlflow_runs, moeplat, resume_copies, start_run

pytestmark = pytest.mark.slow
COMMON = [
    "parallel.accelerator=cpu",
    "train.log_every=1",
    "train.val_every=4",
    "train.schedule={kind: constant}",
]
SINGLE = ["train.batch_size=8"]
EP = ["train.batch_size=4", "parallel.devices=2", "parallel.strategy={kind: expert_parallel, ep_size: 2}"]


def _run(tmp: Path, name: str, overrides: list[str], *extra: str):
    return start_run(tmp, name, [*COMMON, *overrides], *extra)


def _finish(proc) -> str:
    return finish(proc, timeout=300)


def _losses(client, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def _run_dir(tmp: Path, name: str) -> Path:
    (state,) = (tmp / name).glob("tiny/*/run.json")
    return state.parent


def test_expert_parallel_run_matches_one_process_resumes_and_evaluates_on_one_device(tmp_path):
    procs = {
        "single": _run(tmp_path, "single", [*SINGLE, "train.max_steps=6"]),
        "ep": _run(tmp_path, "ep", [*EP, "train.max_steps=4"]),
    }
    outputs = {name: _finish(p) for name, p in procs.items()}
    client, runs = mlflow_runs(tmp_path, "ep")
    assert len(runs) == 1  # both ranks, one MLflow run
    run = runs[0]
    ep = _losses(client, run.info.run_id)
    single_client, single_runs = mlflow_runs(tmp_path, "single")
    single = _losses(single_client, single_runs[0].info.run_id)
    assert sorted(ep) == [0, 1, 2, 3] and sorted(single) == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([ep[s] for s in range(4)]),
        torch.tensor([single[s] for s in range(4)]),
        rtol=1e-5,
        atol=0,
    )
    assert single[3] < single[0]  # it trained
    assert outputs["ep"].count("run finished") == 1  # rank 1's summary went to its log
    assert len(list((tmp_path / "ep").glob("tiny/*/logs/rank1.log"))) == 1

    # Per-rank expert load (rank 0 logs the world's load): EP rank j computes experts 2j, 2j+1.
    m = run.data.metrics
    for layer in ("00", "01"):
        load = [m[f"moe/layer{layer}/load/e{e:02d}"] for e in range(4)]
        ranks = [m[f"moe/layer{layer}/ep_load/r{j:02d}"] for j in range(2)]
        assert ranks == pytest.approx([load[0] + load[1], load[2] + load[3]], abs=1e-6)
        assert sum(ranks) == pytest.approx(1.0, abs=1e-6)
    assert "moe/layer00/load_balancing" in m  # the balance loss was on, and it still matches

    # The model artifact is the single-process layout: eval rebuilds it on one device.
    out = _finish(
        moeplat(tmp_path, "eval", run.info.run_id, "--tracking-uri", f"sqlite:///{tmp_path}/ep.db", "--json")
    )
    result = json.loads(out[out.index("{") :])
    assert result["val/loss"] == pytest.approx(m["val/loss"], rel=1e-5)

    # The ep_size-2 checkpoint (full layout: weights and Adam moments) resumes on one device and on
    # 2 EP ranks; both continue as the uninterrupted single-process run.
    src = _run_dir(tmp_path, "ep")
    # two copies of the run directory and its MLflow store, each resumed at another layout
    layouts = {"resume1": [*SINGLE, "train.max_steps=6"], "resume2": [*EP, "train.max_steps=6"]}
    resumed = resume_copies(tmp_path, src, layouts, _run)
    for name, proc in resumed.items():
        _finish(proc)
        client, runs = mlflow_runs(tmp_path, name)
        assert len(runs) == 1  # continued the same MLflow run
        losses = _losses(client, runs[0].info.run_id)
        assert sorted(losses) == [0, 1, 2, 3, 4, 5], name
        torch.testing.assert_close(
            torch.tensor([losses[4], losses[5]]), torch.tensor([single[4], single[5]]), rtol=1e-5, atol=0
        )


def test_expert_grads_are_averaged_over_the_expert_data_parallel_group(tmp_path):
    """ep_size 1 on 2 ranks: each rank holds every expert, its EDP group is the world, and only
    the EDP all-reduce (reduce_expert_grads; DDP ignores the expert weights) keeps the two copies
    equal. Skipping it trains each copy on its own half of the batch, and the losses drift from
    the single process's. (With ep_size = world the EDP group is one rank and the reduction is a
    1/W scale, which Adam does not see; tests/parallel/test_expert_parallel.py checks the
    gradients themselves.)"""
    layout = [*EP[:-1], "parallel.strategy={kind: expert_parallel, ep_size: 1}"]
    procs = {
        "single": _run(tmp_path, "single", [*SINGLE, "train.max_steps=4"]),
        "edp": _run(tmp_path, "edp", [*layout, "train.max_steps=4", "tracking.log_model=false"]),
    }
    for p in procs.values():
        _finish(p)
    losses = {}
    for name in procs:
        client, runs = mlflow_runs(tmp_path, name)
        losses[name] = _losses(client, runs[0].info.run_id)
    assert sorted(losses["edp"]) == [0, 1, 2, 3]
    torch.testing.assert_close(
        torch.tensor([losses["edp"][s] for s in range(4)]),
        torch.tensor([losses["single"][s] for s in range(4)]),
        rtol=1e-5,
        atol=0,
    )
