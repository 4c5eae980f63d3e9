"""Per-rank checks of global-batch load balancing (tests/parallel/test_global_balance.py), run in
gloo processes spawned by ep_helpers.spawn.

Every rank builds the same float64 TransformerLM (MoE, dense, MoE blocks; same seed) and the same
whole batch of W * A * B_mb sequences; rank r trains rows [r A B_mb, (r+1) A B_mb) as A
accumulation micro-batches, each loss scaled by 1 / A (Lightning's accumulation), then the
data-parallel mean of the gradients (DDP's; expert parallelism reduces its experts apart). The
reference is one process, one forward and backward of LM loss + aux loss on the whole batch.
Sizes are powers of two so that the float32 islands (router softmax, cross-entropy) scale exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeplat.nn.balance import StepLoad, count_step_load
from moeplat.nn.experts import DenseFFN
from moeplat.nn.model import TransformerLM
from moeplat.nn.moe import MoELayer
from moeplat.nn.routers import TopKRouter
from moeplat.parallel.expert_parallel import shard_moe_layers
from moeplat.parallel.grads import reduce_expert_grads, reduce_replicated_grads

V, D, E, K, S, B_MB = 13, 8, 4, 2, 4, 1
LOSS = {"rtol": 1e-6, "atol": 0.0}  # the loss value: float32 means summed in another order
GRAD = {"rtol": 1e-9, "atol": 1e-12}  # measured: float64 round-off


def build_lm(scope: str, ckpt: bool) -> TransformerLM:
    def moe(seed: int) -> MoELayer:
        torch.manual_seed(seed)
        router = TopKRouter(D, E, K, logits_precision="input")
        return MoELayer(
            D, E, K, 12, router=router, balance_coef=0.1, z_loss_coef=0.01, balance_loss_scope=scope
        )

    ffns = [moe(1), DenseFFN(D, 12), moe(2)]
    torch.manual_seed(7)
    return TransformerLM(V, D, 2, 1, 16, ffns, activation_checkpointing=ckpt).double()


def whole_batch(world: int, accumulate: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = world * accumulate * B_MB
    return torch.randint(0, V, (n, S), generator=g), torch.randint(0, V, (n, S), generator=g)


def reference(scope: str, world: int, accumulate: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build_lm(scope, ckpt=False)
    x, y = whole_batch(world, accumulate)
    out = model(x, y)
    loss = out.loss + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def data_parallel_step(
    rank: int, world: int, model: TransformerLM, accumulate: int, reduce=_sum
) -> torch.Tensor:
    """One optimizer step's gradients on this rank (not yet reduced); the step's loss, averaged
    over micro-batches and ranks."""
    x, y = whole_batch(world, accumulate)
    rows = slice(rank * accumulate * B_MB, (rank + 1) * accumulate * B_MB)
    xs, ys = x[rows].chunk(accumulate), y[rows].chunk(accumulate)
    if accumulate > 1:  # the routing pre-pass: f of the whole step before any backward
        plan = count_step_load(model, xs, reduce)
    total = torch.zeros(())  # float32, as the LM loss
    for x_mb, y_mb in zip(xs, ys, strict=True):
        step_load = plan if accumulate > 1 else StepLoad(reduce=reduce)
        out = model(x_mb, y_mb, step_load=step_load)
        loss = (out.loss + out.aux_loss) / accumulate
        loss.backward()
        total += loss.detach()
    return _sum(total) / world


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def case_ddp(rank: int, world: int, accumulate: int, ckpt: bool) -> None:
    """scope global_batch under W ranks x A micro-batches: loss and every gradient equal one
    process on the whole batch, with activation checkpointing on or off."""
    want_loss, want = reference("global_batch", world, accumulate)
    model = build_lm("global_batch", ckpt)
    loss = data_parallel_step(rank, world, model, accumulate)
    reduce_replicated_grads(model)
    _check("loss", loss, want_loss, LOSS)
    for n, p in model.named_parameters():
        _check(f"{n}.grad", p.grad, want[n], GRAD)


def case_micro_batch_differs(rank: int, world: int, accumulate: int) -> None:
    """The same layout with scope micro_batch does not give the whole batch's router gradient
    (so the equality above is the scope's doing)."""
    _, want = reference("global_batch", world, accumulate)
    model = build_lm("micro_batch", ckpt=False)
    data_parallel_step(rank, world, model, accumulate)
    reduce_replicated_grads(model)
    router = model.get_parameter("blocks.0.ffn.router.weight")
    assert not torch.allclose(router.grad, want["blocks.0.ffn.router.weight"], rtol=1e-6, atol=0)


def case_expert_parallel(rank: int, world: int, accumulate: int, ckpt: bool) -> None:
    """Under expert parallelism with balance_scope "global" the layers' counts are already the
    world's (no reduce of f); experts sharded over all ranks: equal to the whole batch too."""
    from ep_helpers import groups_of

    want_loss, want = reference("global_batch", world, accumulate)
    model = build_lm("global_batch", ckpt)
    groups = groups_of(world)
    shard_moe_layers(model, groups)
    assert all(m.losses_over_world for m in (model.blocks[0].ffn, model.blocks[2].ffn))
    # each rank's aux loss is the world's: the objective is mean_r LM_r + aux, as the reference's
    loss = data_parallel_step(rank, world, model, accumulate, reduce=None)
    reduce_replicated_grads(model)
    reduce_expert_grads(model)
    _check("loss", loss, want_loss, LOSS)
    mine = groups.local_experts(E)
    for n, p in model.named_parameters():
        w = want[n][mine.start : mine.stop] if ".experts." in n else want[n]
        _check(f"{n}.grad", p.grad, w, GRAD)


def run_cases(rank: int, world: int, cases: list[tuple[str, tuple]]) -> None:
    for name, args in cases:
        try:
            globals()[name](rank, world, *args)
        except AssertionError as e:
            raise AssertionError(f"{name}{args} on rank {rank} of {world}: {e}") from e
