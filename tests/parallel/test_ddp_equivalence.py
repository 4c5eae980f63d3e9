"""Data parallel training is the same computation as one process with the global batch:
`moeplat run` of the tiny spec for 4 steps with 2 CPU processes (DDP, gloo, per-device batch 4)
logs the same per-step training losses as 1 process with batch 8, to float32 round-off.

The runs go through the real command line (Lightning's launcher re-executes it for rank 1), the
real MLflow store, and check that the two ranks made ONE MLflow run and rank 1 wrote its log.

The Switch load-balancing loss is switched off here: E * sum_i f_i P_i is a product of batch means,
so a rank computing it over its half of the batch optimises a (slightly) different objective than
one process over the whole batch (the same holds for train.grad_accum). The z-loss and the LM loss
are plain token means and stay on. FSDP is FSDP2 (fully_shard, through Lightning's
ModelParallelStrategy), which runs on CPU with gloo: the same check holds for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import finish, mlflow_runs, start_run

pytestmark = pytest.mark.slow
COMMON = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.val_every=4",
    "model.moe.losses.load_balancing=null",
]


def _start(tmp: Path, name: str, overrides: list[str]):
    return start_run(tmp, name, [*COMMON, *overrides])


def _finish(proc) -> str:
    return finish(proc, timeout=240)


def _losses(tmp: Path, name: str, key: str = "train/loss") -> tuple[list[float], int]:
    client, runs = mlflow_runs(tmp, name)
    history = client.get_metric_history(runs[0].info.run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)], len(runs)


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    procs = {
        "single": _start(tmp_path, "single", ["parallel.accelerator=cpu", "train.batch_size=8"]),
        "ddp": _start(
            tmp_path,
            "ddp",
            [
                "parallel.accelerator=cpu",
                "train.batch_size=4",
                "parallel.devices=2",
                "parallel.strategy.kind=ddp",
            ],
        ),
    }
    outputs = {name: _finish(p) for name, p in procs.items()}
    single, n_single = _losses(tmp_path, "single")
    ddp, n_ddp = _losses(tmp_path, "ddp")
    assert n_single == n_ddp == 1  # both ranks, one MLflow run
    assert len(single) == len(ddp) == 4
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=0)
    assert single[-1] < single[0]  # it trained
    # MoE telemetry is the whole global batch's (moeplat.nn.stats.world_stats), not rank 0's shard
    for key in ("moe/all/maxvio", "moe/all/router_entropy", "moe/layer00/load/e00"):
        ddp_k, single_k = _losses(tmp_path, "ddp", key)[0], _losses(tmp_path, "single", key)[0]
        assert len(ddp_k) == len(single_k) == 4, key
        torch.testing.assert_close(torch.tensor(ddp_k), torch.tensor(single_k), rtol=1e-4, atol=1e-6)
    assert outputs["ddp"].count("run finished") == 1  # rank 1's summary went to its log
    logs = list((tmp_path / "ddp").glob("tiny/*/logs/rank1.log"))
    assert len(logs) == 1
    assert not list((tmp_path / "ddp").glob("tiny/*/logs/rank0.log"))  # rank 0 keeps the console
    assert len(list((tmp_path / "ddp").glob("tiny/*/run.json"))) == 1  # one shared run directory


def test_fsdp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    procs = {
        "single": _start(tmp_path, "single", ["parallel.accelerator=cpu", "train.batch_size=8"]),
        "fsdp": _start(
            tmp_path,
            "fsdp",
            [
                "parallel.accelerator=cpu",
                "train.batch_size=4",
                "parallel.devices=2",
                "parallel.strategy.kind=fsdp",
            ],
        ),
    }
    outputs = {name: _finish(p) for name, p in procs.items()}
    single, _ = _losses(tmp_path, "single")
    fsdp, n = _losses(tmp_path, "fsdp")
    assert n == 1 and len(fsdp) == len(single) == 4
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(single), rtol=1e-5, atol=0)
    assert single[-1] < single[0]
    assert outputs["fsdp"].count("run finished") == 1
    # one checkpoint file gathered on rank 0 (not a folder of shards): it reloads at any world size
    ckpts = list((tmp_path / "fsdp").glob("tiny/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1 and ckpts[0].is_file()
