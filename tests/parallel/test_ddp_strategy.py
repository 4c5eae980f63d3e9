"""parallel.strategy -> Lightning strategy, and parallel.activation_checkpointing -> the model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from postgres import free_port

from moeplat.compile.model import build_model
from moeplat.compile.trainer import (
    build_strategy,
    check_trainable,
    fsdp_parallelize,
    process_group_backend,
    trainer_kwargs,
)
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny.yaml"


def _spec(*overrides: str):
    return load_spec(TINY, ["parallel.accelerator=cpu", *overrides]).spec


def test_ddp_maps_to_lightning_ddp_on_gloo_with_our_sampler():
    spec = _spec("parallel.devices=2", "parallel.num_nodes=3", "parallel.strategy.kind=ddp")
    kw = trainer_kwargs(spec)
    s = kw["strategy"]
    assert isinstance(s, DDPStrategy) and s.process_group_backend == "gloo"
    assert kw["devices"] == 2 and kw["num_nodes"] == 3
    assert kw["use_distributed_sampler"] is False  # moeplat.data.resumable shards the batches
    assert trainer_kwargs(_spec())["strategy"] == "auto"


def test_backend_follows_the_accelerator():
    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("gpu") == "nccl"
    assert process_group_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def test_fsdp_is_fsdp2_on_a_mesh_sized_for_the_sharding():
    full = build_strategy(_spec("parallel.devices=2", "parallel.num_nodes=3", "parallel.strategy.kind=fsdp"))
    assert isinstance(full, ModelParallelStrategy) and full.process_group_backend == "gloo"
    assert (full._data_parallel_size, full._tensor_parallel_size) == (6, 1)  # shard over all 6 ranks
    hybrid = build_strategy(
        _spec(
            "parallel.devices=2", "parallel.num_nodes=3", "parallel.strategy={kind: fsdp, sharding: hybrid}"
        )
    )
    assert (hybrid._data_parallel_size, hybrid._tensor_parallel_size) == ("auto", "auto")  # nodes x devices


@pytest.fixture
def one_rank_mesh(monkeypatch):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("sharding", "placements", "kept_after_forward"),
    [
        ("full", "(Shard(dim=0),)", False),
        ("grad_op", "(Shard(dim=0),)", True),
        ("hybrid", "(Replicate(), Shard(dim=0))", False),
        ("no_shard", "(Replicate(), Shard(dim=0))", False),
    ],
)
def test_fsdp_sharding_sets_the_layout(one_rank_mesh, sharding, placements, kept_after_forward):
    """fsdp.sharding changes how FSDP2 lays the parameters out: the placements (1D shard vs the
    2D replicate x shard mesh), and whether a block's parameters stay gathered after the forward
    pass for the backward (grad_op, ZeRO-2) or are freed again."""
    from torch.distributed.tensor import DTensor

    model = build_model(_spec())
    fsdp_parallelize(one_rank_mesh, sharding)(model)
    block = model.blocks[0]
    assert str(next(block.parameters()).placements) == placements
    model(torch.zeros(1, 8, dtype=torch.long))
    assert (not isinstance(next(block.parameters()), DTensor)) == kept_after_forward


def test_fsdp_holds_refer_to_the_sharded_parameters(one_rank_mesh):
    """fully_shard replaces the parameters: LMSystem.configure_model rebuilds the update schedule
    (freeze, router warm-up) on the new ones, or holding a group would drop no gradient."""
    from torch.distributed.tensor import DTensor

    from moeplat.compile.optim import build_update_schedule
    from moeplat.train.system import LMSystem

    spec = _spec("train.router_frozen_steps=2")
    model = build_model(spec)
    system = LMSystem(model, lambda m: None, updates=build_update_schedule(spec.train, model))
    system.parallelize = fsdp_parallelize(one_rank_mesh, "full")
    system.configure_model()
    held = {id(p) for p in system.updates.groups["router"]}
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and {id(p) for p in routers} == held
    assert all(isinstance(p, DTensor) for p in routers)


def test_expert_parallel_with_compile_is_refused_with_the_field():
    """expert_parallel trains with a DDP (tests/parallel/test_ep_run.py) or FSDP2
    (tests/parallel/test_ep_fsdp.py) dense part, but not with torch.compile: refused before
    anything starts."""
    from moeplat.parallel.lightning import expert_parallel_strategy

    ep = "parallel.strategy={kind: expert_parallel, ep_size: 2}"
    fsdp = _spec("parallel.devices=2", ep[:-1] + ", dense: fsdp}")
    for spec in (_spec("parallel.devices=2", ep), fsdp):
        check_trainable(spec)
    assert isinstance(expert_parallel_strategy(_spec("parallel.devices=2", ep)), DDPStrategy)
    s = expert_parallel_strategy(fsdp)
    assert isinstance(s, ModelParallelStrategy) and s.ep_size == 2 and s._data_parallel_size == 2
    with pytest.raises(SpecError) as err:
        check_trainable(_spec("parallel.devices=2", ep, "train.compile=true"))
    assert err.value.issues[0].path == "train.compile"


def test_strategy_registers_the_gloo_destroy_at_exit(monkeypatch):
    registered = []
    monkeypatch.setattr("moeplat.compile.trainer.atexit.register", registered.append)
    s = build_strategy(_spec("parallel.devices=2", "parallel.strategy.kind=ddp"))
    monkeypatch.setattr(DDPStrategy, "setup_environment", lambda self: None)
    s.setup_environment()
    assert [f.__name__ for f in registered] == ["_destroy_process_group"]


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    plain = build_model(_spec())
    ckpt = build_model(_spec("parallel.activation_checkpointing=true"))
    assert ckpt.activation_checkpointing and not plain.activation_checkpointing
    calls = {"plain": 0, "ckpt": 0}
    plain.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, ckpt):
        out = model(idx, idx)
        (out.loss + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert calls == {"plain": 1, "ckpt": 2}  # the block ran again in backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trainer_builds_with_ddp_on_cpu():
    tr = L.Trainer(
        **trainer_kwargs(_spec("parallel.devices=2", "parallel.strategy.kind=ddp")),
        logger=False,
        enable_checkpointing=False,
    )
    assert type(tr.strategy).__name__ == "DDPStrategy" and tr.num_devices == 2
