"""Expert parallelism in a Lightning run: `parallel.strategy: {kind: expert_parallel}` -> a DDP
strategy whose MoE layers are ExpertParallelMoE (GShard, Lepikhin et al. 2020, sec. 3; the
gradient and checkpoint conventions of moeplat.parallel.grads / .checkpoint).

ExpertParallelStrategy extends Lightning's DDPStrategy at four points:

- setup_environment: once the default process group exists, create the EP/EDP groups, shard every
  MoELayer of the LightningModule (shard_moe_layers) and mark the expert weights ignored by DDP on
  the LightningModule itself, the module DDP wraps; the update schedule (freeze, warm-up,
  alternation) is rebuilt on the sharded parameters. The optimizer is configured later (in
  strategy.setup), on the sharded model;
- optimizer_step: after the closure's backward (every micro-batch) and before
  on_before_optimizer_step and gradient clipping, expert grads are all-reduced over the EDP group
  (sum / W) -- so the clipping norm and the held-group logic see the data-parallel gradient;
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
import gc

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from moeplat.compile.optim import partition
from moeplat.compile.trainer import process_group_backend
from moeplat.parallel.checkpoint import full_state_dict, load_full_state_dict
from moeplat.parallel.expert_parallel import ExpertParallelMoE, shard_moe_layers
from moeplat.parallel.grads import expert_parameters, ignore_expert_params_in_ddp, reduce_expert_grads
from moeplat.parallel.groups import ExpertParallelGroups, init_expert_parallel_groups
from moeplat.spec.root import Spec


class ExpertParallelStrategy(DDPStrategy):
    """DDP for the dense part, the routed experts sharded over EP groups of `ep_size` ranks."""

    def __init__(
        self, *, ep_size: int, dispatcher: str, capacity_scope: str, balance_scope: str = "global", **ddp
    ):
        super().__init__(**ddp)
        self.ep_size = ep_size
        self.ep_options = {
            "dispatcher": dispatcher,
            "capacity_scope": capacity_scope,
            "balance_scope": balance_scope,
        }
        self.ep_groups: ExpertParallelGroups | None = None

    def setup_environment(self) -> None:
        super().setup_environment()  # the default process group exists from here on
        if self.ep_groups is None:
            self.ep_groups = init_expert_parallel_groups(self.ep_size)
            atexit.register(self._release_groups)  # Lightning registers a destroy for NCCL only
        module = self.lightning_module
        if module is not None and not any(isinstance(m, ExpertParallelMoE) for m in module.modules()):
            shard_moe_layers(module, self.ep_groups, **self.ep_options)
            ignore_expert_params_in_ddp(module)  # names relative to the module DDP wraps
            if getattr(module, "updates", None) is not None:  # holds refer to the new parameters
                module.updates = dataclasses.replace(module.updates, groups=partition(module))
            if hasattr(module, "expert_shards"):
                module.expert_shards = self.ep_size

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        def backward_then_reduce():
            out = closure()  # forward + backward of the last micro-batch (DDP reduces the dense grads)
            reduce_expert_grads(self.lightning_module)
            return out

        return super().optimizer_step(optimizer, backward_then_reduce, model, **kwargs)

    # --- checkpoints in the full (single-process) layout ---------------------------------------

    def lightning_module_state_dict(self) -> dict:
        """Collective: every rank gathers its EP group's expert weights."""
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state_dict with the expert parameters' state (Adam's moments) gathered
        over the EP group, as the single-process optimizer would hold it. Collective."""
        state = optimizer.state_dict()
        for index, (p, layer) in self._expert_indices(optimizer).items():
            group, n = layer.groups.ep_group, layer.groups.ep_size
            for key, t in state["state"].get(index, {}).items():
                if torch.is_tensor(t) and t.shape == p.shape and n > 1:
                    shards = [torch.empty_like(t) for _ in range(n)]
                    dist.all_gather(shards, t.contiguous(), group=group)
                    state["state"][index][key] = torch.cat(shards, dim=0)
        return state

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Slice the full expert state back to this rank's experts, then load as DDP does."""
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            for index, (p, layer) in self._expert_indices(optimizer).items():
                mine = layer.groups.local_experts(layer.num_experts)
                for key, t in opt_state["state"].get(index, {}).items():
                    if torch.is_tensor(t) and t.dim() and t.shape[0] == layer.num_experts:
                        if t.shape[1:] != p.shape[1:]:
                            raise ValueError(f"optimizer state {key} of an expert weight: {tuple(t.shape)}")
                        opt_state["state"][index][key] = t[mine.start : mine.stop].clone()
        super().load_optimizer_state_dict(checkpoint)

    def _expert_indices(self, optimizer) -> dict[int, tuple[torch.nn.Parameter, ExpertParallelMoE]]:
        """optimizer.state_dict() index -> (expert parameter, its layer) for the sharded weights
        (state_dict numbers the parameters in param_groups order)."""
        experts = {id(p): (p, layer) for _, p, layer in expert_parameters(self.lightning_module)}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return {i: experts[id(p)] for i, p in enumerate(params) if id(p) in experts}

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


def expert_parallel_strategy(spec: Spec) -> ExpertParallelStrategy:
    """parallel.strategy {kind: expert_parallel} -> the Lightning strategy (dense: ddp)."""
    s = spec.parallel.strategy
    return ExpertParallelStrategy(
        process_group_backend=process_group_backend(spec.parallel.accelerator),
        ep_size=s.ep_size,
        dispatcher=s.dispatcher,
        capacity_scope=s.capacity_scope,
    )
