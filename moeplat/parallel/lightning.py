"""Expert parallelism in a Lightning run: `parallel.strategy: {kind: expert_parallel}` -> a DDP
strategy whose MoE layers are ExpertParallelMoE (GShard, Lepikhin et al. 2020, sec. 3; the
gradient and checkpoint conventions of moeplat.parallel.grads / .checkpoint).

ExpertParallelStrategy extends Lightning's DDPStrategy at these points (all but the DDP-specific
ignore list live in ExpertParallelMixin, shared with the FSDP2 dense part of
moeplat.parallel.ep_fsdp):

- setup_environment: once the default process group exists, create the EP/EDP groups, shard every
  MoELayer of the LightningModule (shard_moe_layers) and mark the expert weights ignored by DDP on
  the LightningModule itself, the module DDP wraps; the update schedule (freeze, warm-up,
  alternation) is rebuilt on the sharded parameters. The optimizer is configured later (in
  strategy.setup), on the sharded model;
- optimizer_step: after the closure's backward (every micro-batch) and before
  on_before_optimizer_step and gradient clipping, expert grads are all-reduced over the EDP group
  (sum / W) -- so the clipping norm and the held-group logic see the data-parallel gradient;
- gradient clipping: by the global norm of the single-process gradient (moeplat.parallel.clip;
  a rank's own norm would miss the other ranks' experts);
- state dicts: checkpoints and the model artifact hold the full, single-process layout (expert
  weights gathered over the EP group; Adam's per-parameter state gathered likewise), so they load
  at any ep_size, ep_size 1 (`moeplat eval`, a single-device resume) included;
- teardown at exit: the EP/EDP groups are dereferenced and collected before the default group is
  destroyed (a gloo group left to interpreter finalization aborts the process).

The balance losses and router statistics are evaluated over the whole data-parallel world
(balance_scope "global"): every rank's aux loss and load are the single-process ones of the
global batch, so W ranks train exactly as one process with the W-times batch.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, Strategy

from moeplat.compile.optim import partition
from moeplat.compile.trainer import process_group_backend
from moeplat.parallel.checkpoint import (
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    shard_optimizer_state,
)
from moeplat.parallel.clip import clip_grad_norm_
from moeplat.parallel.expert_parallel import ExpertParallelMoE, shard_moe_layers
from moeplat.parallel.grads import ignore_expert_params_in_ddp, reduce_expert_grads
from moeplat.parallel.groups import ExpertParallelGroups, init_expert_parallel_groups
from moeplat.spec.root import Spec


class ExpertParallelMixin:
    """The expert-parallel part of a Lightning strategy, whatever shards the dense part: DDP
    (ExpertParallelStrategy below) or FSDP2 (moeplat.parallel.ep_fsdp). Put it first in the bases;
    the dense strategy's class follows it in the MRO."""

    def __init__(
        self, *, ep_size: int, dispatcher: str, capacity_scope: str, balance_scope: str = "global", **dense
    ):
        super().__init__(**dense)
        self.ep_size = ep_size
        self.ep_options = {
            "dispatcher": dispatcher,
            "capacity_scope": capacity_scope,
            "balance_scope": balance_scope,
        }
        self.ep_groups: ExpertParallelGroups | None = None

    def _shard_experts(self) -> torch.nn.Module | None:
        """Once the default process group exists: the EP/EDP groups, then every MoELayer of the
        LightningModule sharded (its update schedule rebuilt on the new parameters). Returns the
        LightningModule when it was sharded now."""
        if self.ep_groups is None:
            self.ep_groups = init_expert_parallel_groups(self.ep_size)
            atexit.register(self._release_groups)  # Lightning registers a destroy for NCCL only
        module = self.lightning_module
        if module is None or any(isinstance(m, ExpertParallelMoE) for m in module.modules()):
            return None
        shard_moe_layers(module, self.ep_groups, **self.ep_options)
        if getattr(module, "updates", None) is not None:  # holds refer to the new parameters
            module.updates = dataclasses.replace(module.updates, groups=partition(module))
        if hasattr(module, "expert_shards"):
            module.expert_shards = self.ep_size
        return module

    def setup(self, trainer) -> None:
        super().setup(trainer)
        # clip by the norm of the whole (single-process) gradient, not of this rank's pieces
        self.precision_plugin.clip_grad_by_norm = functools.partial(
            clip_grad_norm_, model=self.lightning_module
        )

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        def backward_then_reduce():
            out = closure()  # forward + backward of the last micro-batch (dense grads reduced by then)
            reduce_expert_grads(self.lightning_module)
            return out

        return super().optimizer_step(optimizer, backward_then_reduce, model, **kwargs)

    # --- checkpoints in the full (single-process) layout ---------------------------------------

    def lightning_module_state_dict(self) -> dict:
        """Collective: every rank gathers its EP group's expert weights (and FSDP2's shards)."""
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state_dict as the single-process optimizer would hold it. Collective."""
        return full_optimizer_state(getattr(optimizer, "_optimizer", optimizer), self.lightning_module)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Cut the full state to this rank's experts (and FSDP2 shards), then load it."""
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            shard_optimizer_state(opt_state, optimizer, self.lightning_module)
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def _release_groups(self) -> None:
        """At exit, while Python is alive: drop every reference to the EP/EDP groups (ours, the
        layers', DDP's reducer in a reference cycle), collect, destroy the default group (and with
        it every subgroup), collect again -- the sequence of tests/parallel/ep_helpers.py."""
        self.ep_groups = None
        module = self.lightning_module
        if module is not None:
            for m in module.modules():
                if isinstance(m, ExpertParallelMoE):
                    m.groups = None
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()


class ExpertParallelStrategy(ExpertParallelMixin, DDPStrategy):
    """DDP for the dense part, the routed experts sharded over EP groups of `ep_size` ranks."""

    def setup_environment(self) -> None:
        super().setup_environment()  # the default process group exists from here on
        module = self._shard_experts()
        if module is not None:
            ignore_expert_params_in_ddp(module)  # names relative to the module DDP wraps


def expert_parallel_strategy(spec: Spec) -> ExpertParallelMixin:
    """parallel.strategy {kind: expert_parallel} -> the Lightning strategy (dense: ddp or fsdp)."""
    s = spec.parallel.strategy
    if s.dense == "fsdp":
        from moeplat.parallel.ep_fsdp import ExpertParallelFSDPStrategy

        cls = functools.partial(ExpertParallelFSDPStrategy, world_size=spec.parallel.world_size)
    else:
        cls = ExpertParallelStrategy
    return cls(
        process_group_backend=process_group_backend(spec.parallel.accelerator),
        ep_size=s.ep_size,
        dispatcher=s.dispatcher,
        capacity_scope=s.capacity_scope,
    )
