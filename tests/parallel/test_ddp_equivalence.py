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


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: 1 process with the global batch of 8 (run once for both layouts)."""
    tmp = tmp_path_factory.mktemp("single")
    _finish(_start(tmp, "single", ["parallel.accelerator=cpu", "train.batch_size=8"]))
    return tmp


def _two_processes(tmp: Path, strategy: str) -> str:
    """2 CPU processes with per-device batch 4 (the same global batch); their console output."""
    overrides = ["parallel.accelerator=cpu", "train.batch_size=4", "parallel.devices=2"]
    return _finish(_start(tmp, strategy, [*overrides, f"parallel.strategy.kind={strategy}"]))


def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, single):
    output = _two_processes(tmp_path, "ddp")
    reference, n_single = _losses(single, "single")
    ddp, n_ddp = _losses(tmp_path, "ddp")
    assert n_single == n_ddp == 1  # both ranks, one MLflow run
    assert len(reference) == len(ddp) == 4
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(reference), rtol=1e-5, atol=0)
    assert reference[-1] < reference[0]  # it trained
    # MoE telemetry is the whole global batch's (moeplat.nn.stats.world_stats), not rank 0's shard
    for key in ("moe/all/maxvio", "moe/all/router_entropy", "moe/layer00/load/e00"):
        ddp_k, single_k = _losses(tmp_path, "ddp", key)[0], _losses(single, "single", key)[0]
        assert len(ddp_k) == len(single_k) == 4, key
        torch.testing.assert_close(torch.tensor(ddp_k), torch.tensor(single_k), rtol=1e-4, atol=1e-6)
    assert output.count("run finished") == 1  # rank 1's summary went to its log
    logs = list((tmp_path / "ddp").glob("tiny/*/logs/rank1.log"))
    assert len(logs) == 1
    assert not list((tmp_path / "ddp").glob("tiny/*/logs/rank0.log"))  # rank 0 keeps the console
    assert len(list((tmp_path / "ddp").glob("tiny/*/run.json"))) == 1  # one shared run directory


def test_fsdp_two_processes_match_one_process_with_the_global_batch(tmp_path, single):
    output = _two_processes(tmp_path, "fsdp")
    reference, _ = _losses(single, "single")
    fsdp, n = _losses(tmp_path, "fsdp")
    assert n == 1 and len(fsdp) == len(reference) == 4
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(reference), rtol=1e-5, atol=0)
    assert reference[-1] < reference[0]
    assert output.count("run finished") == 1
    # one checkpoint file gathered on rank 0 (not a folder of shards): it reloads at any world size
    ckpts = list((tmp_path / "fsdp").glob("tiny/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1 and ckpts[0].is_file()
