"""Preflight of a parallel layout, from the spec alone (no torch): memory per device and bytes
moved per optimizer step. `moeplat plan --devices N --nodes M` prints it and `moeplat run` checks
it before anything starts. Divisibility (experts by ep_size, world size by ep_size) is part of spec
validation (moeplat.spec.root.parallel_model_problems, ParallelSpec); here the memory check.

Memory per device, bytes (an estimate for planning, as moeplat.spec.plan.memory_estimate):
  weights 4, grads 4, optimizer 8 bytes per parameter held by the device (fp32 master weights and
  AdamW's two moments, also under mixed precision). Held: all parameters (single, ddp, fsdp
  no_shard); 1/world of them (fsdp full: ZeRO-3, Rajbhandari et al. 2020); weights whole and grads
  and optimizer 1/world (fsdp grad_op: ZeRO-2); 1/devices (fsdp hybrid: sharded within a node).
  expert_parallel: routed experts / ep_size, the rest as its `dense` strategy (ddp or fsdp full).
  activations: plan's per-micro-batch estimate; with activation checkpointing only each block's
  input (D float32 values per token) is stored, plus the largest block's activations recomputed
  at a time and the head's (moeplat.spec.plan_memory).
  all-to-all buffers (expert_parallel): one MoE layer's send and receive buffers at a time,
  2 x tokens x top_k x D (all_to_all) or ep_size x tokens x D gathered plus tokens x D (all_gather).
Communication per device and optimizer step (bytes sent):
  data-parallel gradient all-reduce: ring, 2 (N - 1) / N x 4 bytes x parameters reduced over N ranks
  (fsdp: reduce-scatter + all-gather of parameters in forward and backward, 3 x (N - 1) / N x 4 P).
  all-to-all: per MoE layer and micro-batch, dispatch and combine in forward and both again in
  backward, (ep - 1) / ep of tokens x top_k x D x activation bytes each (balanced routing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moeplat.spec.plan import Plan
from moeplat.spec.plan_memory import activation_bytes
from moeplat.spec.root import Spec
from moeplat.spec.sections import ExpertParallel

GiB = 1024**3


@dataclass(frozen=True)
class Preflight:
    world_size: int
    data_parallel: int  # ranks that see different data (= world size: EP shards experts, not data)
    ep_size: int
    global_batch: int  # sequences per optimizer step, all ranks and micro-batches
    memory_bytes: dict  # per device: weights, grads, optimizer, activations, all_to_all_buffers, total
    comm_bytes_per_step: dict  # per device: dp_gradients, all_to_all, total
    problems: list[tuple[str, str]]

    def to_dict(self) -> dict:
        return asdict(self)


def _state_bytes(spec: Spec, p: Plan) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per device."""
    par, W = spec.parallel, spec.parallel.world_size
    s = par.strategy
    if isinstance(s, ExpertParallel):
        dense = p.total_params - p.expert_params
        held = p.expert_params / s.ep_size + (dense / W if s.dense == "fsdp" else dense)
        return 4 * held, 4 * held, 8 * held
    if s.kind == "fsdp":
        shards = {"full": W, "grad_op": 1, "hybrid": par.devices, "no_shard": 1}[s.sharding]
        rest = {"full": W, "grad_op": W, "hybrid": par.devices, "no_shard": 1}[s.sharding]
        P = p.total_params
        return 4 * P / shards, 4 * P / rest, 8 * P / rest
    return 4 * p.total_params, 4 * p.total_params, 8 * p.total_params


def _activation_bytes(spec: Spec, p: Plan) -> float:
    full = p.memory_bytes["activations"]
    if not spec.parallel.activation_checkpointing:
        return full
    blocks, head = activation_bytes(spec)
    tokens = spec.data.seq_len * spec.train.batch_size
    # each block's input (the float32 residual stream), one block recomputed at a time, the head
    return spec.model.n_layers * spec.model.d_model * tokens * 4 + max(blocks) + head


def _moe_top_ks(spec: Spec) -> list[int]:
    moe = spec.model.moe
    return [moe.shape(j).routed_top_k for j in range(len(spec.model.moe_layers))] if moe else []


def _all_to_all(spec: Spec) -> tuple[float, float]:
    """(buffer bytes, bytes sent per optimizer step) of the expert-parallel token exchange."""
    s = spec.parallel.strategy
    if not isinstance(s, ExpertParallel) or s.ep_size == 1:
        return 0.0, 0.0
    t, d = spec.train, spec.model.d_model
    act = 2 if t.precision != "32-true" else 4
    tokens = spec.data.seq_len * t.batch_size
    leave = (s.ep_size - 1) / s.ep_size
    buffers, sent = 0.0, 0.0
    for k in _moe_top_ks(spec):
        if s.dispatcher == "all_to_all":
            buffers = max(buffers, 2 * tokens * k * d * act)
            sent += 4 * leave * tokens * k * d * act  # dispatch + combine, forward and backward
        else:  # all_gather: every rank gathers the group's tokens, outputs are reduce-scattered
            buffers = max(buffers, (s.ep_size + 1) * tokens * d * act)
            sent += 4 * (s.ep_size - 1) * tokens * d * act
    return buffers, sent * t.grad_accum


def _dp_gradient_bytes(spec: Spec, p: Plan) -> float:
    par, W = spec.parallel, spec.parallel.world_size
    s = par.strategy
    if W == 1:
        return 0.0
    ring = (W - 1) / W
    if isinstance(s, ExpertParallel):
        dense = p.total_params - p.expert_params
        dp_experts = W // s.ep_size  # replicas of each expert shard
        dense_f = 3 if s.dense == "fsdp" else 2
        experts = 2 * (dp_experts - 1) / dp_experts * 4 * p.expert_params / s.ep_size if dp_experts > 1 else 0
        return dense_f * ring * 4 * dense + experts
    if s.kind == "fsdp" and s.sharding in ("full", "hybrid"):
        return 3 * ring * 4 * p.total_params
    return 2 * ring * 4 * p.total_params


def preflight(spec: Spec, p: Plan, device_memory_gib: float | None = None) -> Preflight:
    """Memory and communication per device of `spec`'s parallel layout; `problems` is non-empty
    when the estimate exceeds `device_memory_gib` (None: not checked)."""
    par, t = spec.parallel, spec.train
    weights, grads, optimizer = _state_bytes(spec, p)
    buffers, a2a = _all_to_all(spec)
    memory = {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": _activation_bytes(spec, p),
        "all_to_all_buffers": buffers,
    }
    memory = {k: int(v) for k, v in memory.items()}
    memory["total"] = sum(memory.values())
    # gradients are reduced once per optimizer step, after accumulation
    comm = {"dp_gradients": int(_dp_gradient_bytes(spec, p)), "all_to_all": int(a2a)}
    comm["total"] = sum(comm.values())
    problems = []
    if device_memory_gib is not None and memory["total"] > device_memory_gib * GiB:
        problems.append(
            (
                "parallel",
                f"needs about {memory['total'] / GiB:.1f} GiB per device, the device has "
                f"{device_memory_gib:.1f} GiB: raise parallel.devices / parallel.num_nodes, shard with "
                "parallel.strategy (fsdp, expert_parallel), set parallel.activation_checkpointing: true "
                "or lower train.batch_size",
            )
        )
    ep = par.strategy.ep_size if isinstance(par.strategy, ExpertParallel) else 1
    return Preflight(
        world_size=par.world_size,
        data_parallel=par.world_size,
        ep_size=ep,
        global_batch=t.batch_size * t.grad_accum * par.world_size,
        memory_bytes=memory,
        comm_bytes_per_step=comm,
        problems=problems,
    )
