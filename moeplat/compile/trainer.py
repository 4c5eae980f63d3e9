"""Spec -> Lightning Trainer arguments, strategy and checkpointing. (The trainer itself is built in
train/run.py.)"""

from __future__ import annotations

import atexit
import functools
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.root import Spec

# spec fsdp.sharding -> FSDP2 (torch.distributed.fsdp.fully_shard) layout: whether parameters are
# freed again after the forward pass (reshard_after_forward), and whether the device mesh is the 1D
# "shard over every rank" or the 2D HSDP mesh (replicate over dim 0, shard over dim 1).
FSDP_SHARDING = {
    "full": {"reshard_after_forward": True, "mesh": "shard_all"},  # ZeRO-3
    "grad_op": {"reshard_after_forward": False, "mesh": "shard_all"},  # ZeRO-2: params kept for backward
    "hybrid": {"reshard_after_forward": True, "mesh": "nodes_x_devices"},  # shard in a node, replicate across
    "no_shard": {"reshard_after_forward": True, "mesh": "replicate_all"},  # DDP semantics
}

EP_COMPILE = (
    "train.compile with expert_parallel is not supported: the MoE layers are sharded after the model "
    "is built (moeplat.parallel.lightning); set train.compile: false"
)


def process_group_backend(accelerator: str) -> str:
    """gloo on CPU, nccl on GPU; 'auto' is GPU when CUDA is available (as Lightning decides)."""
    import torch

    gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    return "nccl" if gpu else "gloo"


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _destroy_at_exit(strategy_cls):
    """Lightning registers destroy_process_group at exit for NCCL only; a gloo group left to
    interpreter finalization can abort the process ("terminate called without an active
    exception", pytorch/pytorch#190489), so every rank destroys it while Python is alive."""

    class Strategy(strategy_cls):
        def setup_environment(self) -> None:
            super().setup_environment()
            atexit.register(_destroy_process_group)

    Strategy.__name__ = Strategy.__qualname__ = strategy_cls.__name__
    return Strategy


def check_trainable(spec: Spec) -> None:
    """Refuse, before anything starts, a layout the trainer cannot run yet (exit code 2):
    expert_parallel with train.compile."""
    s = spec.parallel.strategy
    if s.kind == "expert_parallel" and spec.train.compile:
        raise SpecError(SpecIssue("train.compile", EP_COMPILE))


def build_strategy(spec: Spec):
    """parallel.strategy -> a Lightning strategy ("auto" for one device). expert_parallel's
    strategy lives in moeplat.parallel.lightning (compile may not import parallel): the caller
    passes it to trainer_kwargs."""
    from lightning.pytorch.strategies import DDPStrategy

    par = spec.parallel
    s, backend = par.strategy, process_group_backend(par.accelerator)
    if s.kind == "single":
        return "auto"  # one device: Lightning's single-device strategy
    if s.kind == "ddp":
        return _destroy_at_exit(DDPStrategy)(process_group_backend=backend)
    if s.kind == "fsdp":
        return fsdp_strategy(s.sharding, backend, par.devices * par.num_nodes)
    raise SpecError(
        SpecIssue(
            "parallel.strategy.kind",
            "expert_parallel: use moeplat.parallel.lightning.expert_parallel_strategy",
        )
    )


def fsdp_strategy(sharding: str, backend: str, world_size: int):
    """FSDP2 through Lightning's ModelParallelStrategy: the system's configure_model shards each
    transformer block, then the root (one all-gather per block, freed after use when resharding).
    FSDP2 runs on CPU with gloo, where torch's FSDP1 refuses ("FSDP needs a non-CPU accelerator").
    The checkpoint is gathered into one file on rank 0, so it reloads at any world size."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    layout = FSDP_SHARDING[sharding]
    # Lightning's mesh is (data_parallel, tensor_parallel); we use it as (replicate, shard)
    sizes = {
        "shard_all": {"data_parallel_size": world_size, "tensor_parallel_size": 1},
        "replicate_all": {"data_parallel_size": world_size, "tensor_parallel_size": 1},
        "nodes_x_devices": {},  # auto: (num_nodes, devices per node)
    }[layout["mesh"]]

    class FSDP2(_destroy_at_exit(ModelParallelStrategy)):
        def setup_environment(self) -> None:
            super().setup_environment()
            self.lightning_module.parallelize = fsdp_parallelize(self.device_mesh, sharding)

    return FSDP2(save_distributed_checkpoint=False, process_group_backend=backend, **sizes)


def fsdp_parallelize(device_mesh, sharding: str, ignored_params=None):
    """The function that shards a model for `sharding` on Lightning's (data_parallel,
    tensor_parallel) mesh, read as (replicate, shard): fully_shard every transformer block, then
    the rest (embeddings, final norm, head) at the root. `ignored_params` stay plain, unsharded
    tensors (expert parallelism's routed experts, sharded over their EP group instead)."""
    layout = FSDP_SHARDING[sharding]
    mesh = device_mesh["data_parallel"] if layout["mesh"] == "shard_all" else device_mesh
    return functools.partial(
        _shard_blocks,
        mesh=mesh,
        reshard_after_forward=layout["reshard_after_forward"],
        ignored_params=set(ignored_params or ()),
    )


def _shard_blocks(model, mesh, reshard_after_forward: bool, ignored_params: set | None = None) -> None:
    from torch.distributed.fsdp import fully_shard

    from moeplat.nn.model import Block

    opts = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "ignored_params": ignored_params or None,
    }
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, **opts)
    fully_shard(model, **opts)


def trainer_kwargs(spec: Spec, strategy=None) -> dict:
    """`strategy`: a Lightning strategy built elsewhere (expert_parallel); None = build_strategy(spec)."""
    t, par = spec.train, spec.parallel
    return {
        "strategy": build_strategy(spec) if strategy is None else strategy,
        "accelerator": par.accelerator,
        "devices": par.devices,
        "num_nodes": par.num_nodes,
        # Our loader shards the global batch itself (moeplat.data.resumable): Lightning must not
        # replace its sampler, or the batch order would no longer be a function of train.seed.
        "use_distributed_sampler": False,
        "precision": t.precision,
        "max_steps": t.max_steps,
        "accumulate_grad_batches": t.grad_accum,
        "gradient_clip_val": t.grad_clip,
        # Lightning counts val_check_interval in micro-batches; the spec counts optimizer steps.
        "val_check_interval": t.val_every * t.grad_accum,
        "check_val_every_n_epoch": None,
        # limit_val_batches stays Lightning's default (all): validation covers exactly the data
        # module's validation sets, data.val_tokens of each source.
        "num_sanity_val_steps": 0,
        "log_every_n_steps": t.log_every,
        "enable_model_summary": False,
    }


def checkpoint_callback(spec: Spec, dirpath: Path) -> ModelCheckpoint:
    """train.checkpoint.keep null (the default): checkpoint_every N -> a checkpoint every N
    optimizer steps (all kept) plus last.ckpt; null -> at every validation, the best by val/loss
    plus last.ckpt."""
    every = spec.train.checkpoint_every
    common = {"dirpath": dirpath, "save_last": True, "auto_insert_metric_name": False}
    if every:
        return ModelCheckpoint(every_n_train_steps=every, save_top_k=-1, filename="step{step:06d}", **common)
    return ModelCheckpoint(monitor="val/loss", save_top_k=1, filename="best-step{step:06d}", **common)


def checkpoint_callbacks(spec: Spec, dirpath: Path) -> list[ModelCheckpoint]:
    """The checkpoint writers of train.checkpoint.keep. Every value writes last.ckpt at each
    checkpoint (every checkpoint_every steps, or at each validation), so a killed run resumes;
    best and none have it deleted at the successful end (moeplat.compile.checkpoints). Two writers
    only where they fire at different times (Lightning needs their state keys distinct)."""
    keep, every = spec.train.checkpoint.keep, spec.train.checkpoint_every
    if keep is None:
        return [checkpoint_callback(spec, dirpath)]
    when = {"every_n_train_steps": every} if every else {"monitor": "val/loss"}  # monitor: at validation
    common = {"dirpath": dirpath, "auto_insert_metric_name": False}
    if keep == "all":
        return [ModelCheckpoint(save_top_k=-1, save_last=True, filename="step{step:06d}", **when, **common)]
    best = {"monitor": "val/loss", "save_top_k": 1, "filename": "best-step{step:06d}", **common}
    if keep == "best" and not every:
        return [ModelCheckpoint(save_last=True, **best)]
    last = ModelCheckpoint(save_top_k=0, save_last=True, **when, **common)
    return [ModelCheckpoint(save_last=False, **best), last] if keep == "best" else [last]
