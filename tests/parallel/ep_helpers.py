"""Spawn N CPU processes on gloo, and the per-rank checks of tests/parallel/test_expert_parallel.py.

Every check builds the same float64 MoELayer on every rank (same seed) and the same global batch;
rank r takes rows [r B, (r+1) B). The reference is the single-process layer on the whole batch,
objective J = sum(y * g) + aux_loss. Each rank's loss is L_r = W * sum(y_r * g_r) + aux_r, so the
data-parallel objective mean_r L_r is J: after the DDP-style reduction (mean of replicated grads,
EDP sum / W of expert grads) every gradient must equal the reference's, and x_r.grad / W too.
"""

from __future__ import annotations

import copy
import gc
import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeplat.nn.experts import DenseFFN
from moeplat.nn.model import TransformerLM
from moeplat.nn.moe import MoELayer
from moeplat.nn.routers import TopKRouter
from moeplat.parallel.checkpoint import full_state_dict, load_full_state_dict
from moeplat.parallel.expert_parallel import ExpertParallelMoE, shard_moe_layers
from moeplat.parallel.grads import (
    ignore_expert_params_in_ddp,
    reduce_expert_grads,
    reduce_replicated_grads,
)
from moeplat.parallel.groups import ExpertParallelGroups, init_expert_parallel_groups

D, F, B, S = 6, 5, 2, 3  # tiny: B sequences of S tokens per rank
# Measured: every difference is at float64 round-off (<= 4e-16 relative); the float32 router
# probabilities, losses and statistics come out bit-identical (same rows, same concatenation).
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined by a gloo group; re-raises the
    first failure. Each process destroys its group before exiting (a gloo group left to
    interpreter finalization can abort the process: pytorch/pytorch#190489)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(fn, world, free_port(), args), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _worker(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),  # a rank failing mid-collective fails the test, not hangs it
    )
    try:
        fn(rank, world, *args)
    finally:
        # Drop every reference to a process group (our cached EP/EDP groups, DDP's reducer in a
        # reference cycle) and collect while Python is alive: a gloo group destroyed at interpreter
        # finalization aborts the process ("terminate called without an active exception").
        _GROUPS.clear()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def build_layer(E: int, K: int, cf: float | None, seed: int = 0, null_experts: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    router = TopKRouter(D, E, K, logits_precision="input", null_experts=null_experts)
    coefs = dict(balance_coef=0.1, z_loss_coef=0.01, importance_coef=0.1, variance_coef=0.1)
    coefs.update(sequence_balance_coef=0.1)
    layer = MoELayer(
        D, E, K, F, router=router, n_shared_experts=1, shared_gate=True,
        capacity_factor_train=cf, capacity_factor_eval=cf, **coefs, **kw,
    )  # fmt: skip
    return layer.double()


def batch(world: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B, S, D, generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


_GROUPS: dict[int, ExpertParallelGroups] = {}


def groups_of(ep_size: int) -> ExpertParallelGroups:
    """This worker's groups for ep_size, created once (dist.new_group is collective and slow-ish)."""
    if ep_size not in _GROUPS:
        _GROUPS[ep_size] = init_expert_parallel_groups(ep_size)
    return _GROUPS[ep_size]


def run_plan(rank: int, world: int, plan: list[tuple[str, tuple]]) -> None:
    """Run several cases in one set of processes (spawning costs seconds); a failure names its case."""
    for name, args in plan:
        try:
            globals()[name](rank, world, *args)
        except AssertionError as e:
            raise AssertionError(f"{name}{args} on rank {rank} of {world}: {e}") from e


def _mine(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * B : (rank + 1) * B]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: dict) -> None:
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def check_against_single(
    rank: int,
    world: int,
    groups: ExpertParallelGroups,
    E: int,
    K: int,
    cf: float | None,
    null_experts: int = 0,
    **ep_kw,
) -> None:
    """Forward, losses, stats, input and parameter gradients equal the single-process layer."""
    ref = build_layer(E, K, cf, null_experts=null_experts)
    ep = ExpertParallelMoE(build_layer(E, K, cf, null_experts=null_experts), groups, **ep_kw)
    x_all, g_all = batch(world)
    x_all.requires_grad_(True)
    out = ref(x_all)
    ((out.y * g_all).sum() + out.aux_loss).backward()

    x = _mine(x_all.detach(), rank).clone().requires_grad_(True)
    o = ep(x)
    (world * (o.y * _mine(g_all, rank)).sum() + o.aux_loss).backward()
    reduce_replicated_grads(ep)
    reduce_expert_grads(ep)
    _compare(rank, world, ref, out, ep, o, x, x_all, groups, E)


def _compare(rank, world, ref, out, ep, o, x, x_all, groups, E) -> None:
    _close(o.y, _mine(out.y, rank), "y", TIGHT)
    _close(x.grad / world, _mine(x_all.grad, rank), "x.grad", TIGHT)
    _close(o.aux_loss, out.aux_loss, "aux_loss", TIGHT)
    assert o.losses.keys() == out.losses.keys()
    for name in out.losses:
        _close(o.losses[name], out.losses[name], f"losses[{name}]", TIGHT)
    for name in ("load_E", "tokens_per_expert_E", "dropped_frac", "unrouted_frac", "dead_frac"):
        _close(getattr(o.stats, name), getattr(out.stats, name), f"stats.{name}", TIGHT)
    for name in ("experts_per_token", "null_frac"):  # null_frac: None without null experts
        assert (getattr(o.stats, name) is None) == (getattr(out.stats, name) is None), name
        if getattr(out.stats, name) is not None:
            _close(getattr(o.stats, name), getattr(out.stats, name), f"stats.{name}", TIGHT)
    mine = groups.local_experts(E)
    for name, p in ref.named_parameters():
        q = ep.get_parameter(name)
        want = p.grad[mine.start : mine.stop] if name.startswith("experts.") else p.grad
        _close(q.grad, want, f"{name}.grad", TIGHT)


def case_equal_single(rank: int, world: int, ep_size: int, cases: list[dict]) -> None:
    for case in cases:
        try:
            check_against_single(rank, world, groups_of(ep_size), **case)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e


def case_remote_only_and_drops(rank: int, world: int) -> None:
    """The data really exercises what the cases claim: tokens whose experts are all remote, and
    capacity drops under which "global" and "rank" scopes differ."""
    groups = groups_of(world)
    E, K = 2 * world, 1
    ep = ExpertParallelMoE(build_layer(E, K, 0.5), groups)
    x_all, _ = batch(world)
    route = ep.router(_mine(x_all, rank).reshape(-1, D))
    mine = groups.local_experts(E)
    remote_T = ((route.topk_idx_TK < mine.start) | (route.topk_idx_TK >= mine.stop)).all(dim=1)
    counts = torch.tensor([int(remote_T.sum()), int((~remote_T).sum())])
    dist.all_reduce(counts)
    assert counts.min() > 0, f"need tokens routed only to remote experts and some local: {counts}"
    scope_rank = ExpertParallelMoE(build_layer(E, K, 0.5), groups, capacity_scope="rank")
    x = _mine(x_all, rank)
    differs = torch.tensor([float(not torch.equal(ep(x).y, scope_rank(x).y))])
    dist.all_reduce(differs)
    assert differs.item() > 0, "capacity scopes rank and global gave the same output everywhere"
    # "rank" scope equals the single-process layer run on each rank's own tokens.
    ref = build_layer(E, K, 0.5)
    ref.balance_coef = 0.0
    _close(scope_rank(x).y, ref(x).y, "rank-scope y", TIGHT)


def case_ddp(rank: int, world: int, ep_size: int) -> None:
    """Plain torch DDP for the replicated parameters, expert weights excluded and reduced by hand."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    groups = groups_of(ep_size)
    E, K, cf = 4, 2, None
    ref = build_layer(E, K, cf)
    ep = ExpertParallelMoE(build_layer(E, K, cf), groups)
    model = _Unpack(ep)  # names are relative to the module handed to DDP
    assert ignore_expert_params_in_ddp(model) == [f"moe.experts.{w}" for w in ("w_gate", "w_up", "w_down")]
    with torch.no_grad():  # DDP must leave the (differing) expert shards alone at construction
        ep.experts.w_up.add_(0.01 * groups.ep_rank)
        ref.experts.w_up.add_(
            torch.repeat_interleave(0.01 * torch.arange(ep_size, dtype=torch.float64), E // ep_size)[
                :, None, None
            ]
        )
    ddp = DDP(model)
    x_all, g_all = batch(world)
    x_all.requires_grad_(True)
    out = ref(x_all)
    ((out.y * g_all).sum() + out.aux_loss).backward()
    x = _mine(x_all.detach(), rank).clone().requires_grad_(True)
    y, aux = ddp(x)
    (world * (y * _mine(g_all, rank)).sum() + aux).backward()
    reduce_expert_grads(ep)
    for name, p in ref.named_parameters():
        q = ep.get_parameter(name)
        mine = groups.local_experts(E)
        want = p.grad[mine.start : mine.stop] if name.startswith("experts.") else p.grad
        _close(q.grad, want, f"ddp {name}.grad", TIGHT)


class _Unpack(torch.nn.Module):
    def __init__(self, moe: torch.nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.moe(x)
        return out.y, out.aux_loss


def case_checkpoint(rank: int, world: int, save_ep: int, load_eps: list[int], path: str) -> None:
    """Save the full state at ep_size=save_ep; reload it at ep_size 1 (plain MoELayer) and at each
    of load_eps; outputs equal."""
    E, K = 4, 2
    groups = {ep: groups_of(ep) for ep in sorted({save_ep, *load_eps})}
    ep = ExpertParallelMoE(build_layer(E, K, None), groups[save_ep])
    with torch.no_grad():  # shards unlike any fresh init, different per rank
        for p in ep.experts.parameters():
            p.mul_(1.5 + groups[save_ep].ep_rank).add_(0.1)
    x_all, _ = batch(world)
    y = ep(_mine(x_all, rank)).y
    full = full_state_dict(ep)
    if rank == 0:
        torch.save(full, path)
    dist.barrier()
    loaded = torch.load(path)
    plain = build_layer(E, K, None, seed=99)
    plain.load_state_dict(loaded)
    assert loaded.keys() == plain.state_dict().keys()
    _close(_mine(plain(x_all).y, rank), y, f"ep {save_ep} -> plain", TIGHT)
    for n in load_eps:
        again = ExpertParallelMoE(build_layer(E, K, None, seed=7), groups[n])
        load_full_state_dict(again, loaded)
        _close(again(_mine(x_all, rank)).y, y, f"ep {save_ep} -> ep {n}", TIGHT)


def case_dispatchers_agree(rank: int, world: int, ep_size: int) -> None:
    """all_gather and all_to_all dispatchers: same output and same gradients, with drops."""
    groups = groups_of(ep_size)
    results = []
    for dispatcher in ("all_to_all", "all_gather"):
        ep = ExpertParallelMoE(build_layer(8, 2, 0.75), groups, dispatcher=dispatcher)
        x_all, g_all = batch(world)
        x = _mine(x_all, rank).clone().requires_grad_(True)
        o = ep(x)
        ((o.y * _mine(g_all, rank)).sum() + o.aux_loss).backward()
        reduce_expert_grads(ep, average=False)
        results.append([o.y, x.grad] + [copy.deepcopy(p.grad) for p in ep.parameters()])
    for a, b in zip(*results, strict=True):
        _close(a, b, "all_gather vs all_to_all", TIGHT)


def _lm(E: int, K: int, cf: float | None) -> TransformerLM:
    torch.manual_seed(5)
    ffns = [build_layer(E, K, cf, seed=i) for i in (1, 2)]
    ffns.insert(1, DenseFFN(D, F))
    return TransformerLM(11, D, 1, 1, S, ffns).double()


def case_transformer(rank: int, world: int, ep_size: int, cf: float | None) -> None:
    """A whole TransformerLM (MoE, dense, MoE blocks) sharded by shard_moe_layers: logits, aux
    loss and every parameter gradient equal the single-process model's."""
    E, K = 4, 2
    ref, ep = _lm(E, K, cf), _lm(E, K, cf)
    groups = groups_of(ep_size)
    assert shard_moe_layers(ep, groups) == ["blocks.0.ffn", "blocks.2.ffn"]
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 11, (world * B, S), generator=gen)
    g = torch.randn(world * B, S, 11, generator=gen, dtype=torch.float64)
    out = ref(idx)
    ((out.logits_BSV * g).sum() + out.aux_loss).backward()
    o = ep(_mine(idx, rank))
    (world * (o.logits_BSV * _mine(g, rank)).sum() + o.aux_loss).backward()
    reduce_replicated_grads(ep)
    reduce_expert_grads(ep)
    _close(o.logits_BSV, _mine(out.logits_BSV, rank), "lm logits", TIGHT)
    _close(o.aux_loss, out.aux_loss, "lm aux_loss", TIGHT)
    mine = groups.local_experts(E)
    for name, p in ref.named_parameters():
        want = p.grad[mine.start : mine.stop] if ".experts." in name else p.grad
        _close(ep.get_parameter(name).grad, want, f"lm {name}.grad", TIGHT)


def case_collectives(rank: int, world: int) -> None:
    """The autograd collectives on uneven splits (some empty): values and backward routes."""
    from moeplat.parallel.all_to_all import all_gather_rows, all_to_all, gather_sizes, reduce_scatter_rows

    send = [(rank + j) % 3 for j in range(world)]  # rows this rank sends to rank j
    recv = [(j + rank) % 3 for j in range(world)]  # rows rank j sends to this one
    x = torch.cat([torch.full((n,), 100.0 * rank + j, dtype=torch.float64) for j, n in enumerate(send)])
    x.requires_grad_(True)
    y = all_to_all(x[:, None] * torch.ones(1, 2, dtype=torch.float64), recv, send)
    want = torch.cat([torch.full((n,), 100.0 * j + rank, dtype=torch.float64) for j, n in enumerate(recv)])
    assert torch.equal(y[:, 0], want), (y, want)
    (y.detach() * y).sum().backward()  # d/dx of sum(y^2)/2 per element: the rows come back home
    assert torch.equal(x.grad, 2 * x.detach()), (x.grad, x)

    sizes = gather_sizes(rank + 1)
    assert sizes == [j + 1 for j in range(world)], sizes
    a = torch.full((rank + 1, 2), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = all_gather_rows(a, sizes)
    assert torch.equal(
        gathered[:, 0], torch.cat([torch.full((j + 1,), float(j)) for j in range(world)]).double()
    )
    (gathered * (rank + 1)).sum().backward()  # every rank's gradient for my rows, summed
    assert torch.equal(a.grad, torch.full_like(a, world * (world + 1) / 2)), a.grad
    b = torch.ones(sum(sizes), 2, dtype=torch.float64, requires_grad=True)
    mine = reduce_scatter_rows(b * (rank + 1), sizes)
    assert torch.equal(mine, torch.full((rank + 1, 2), world * (world + 1) / 2, dtype=torch.float64))
    mine.sum().backward()
    assert torch.equal(b.grad, torch.full_like(b, rank + 1.0)), b.grad
