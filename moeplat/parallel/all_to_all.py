"""Autograd-aware collectives for expert parallelism, with uneven splits.

One primitive, `all_to_all`: rank i sends rows input_splits[j] of its input to rank j and
receives output_splits[j] rows from rank j. Its backward is the reverse all-to-all (the gradient
rows travel back the way the tokens came: splits swapped), as in GShard (Lepikhin et al. 2020,
sec. 3.2) and Megatron-LM's `_AllToAll`. The all-gather dispatcher's two collectives are built
from it, so their backward passes come for free from autograd:

    all_gather_rows(x)      = all_to_all(x repeated n times)       backward: reduce-scatter (sum)
    reduce_scatter_rows(y)  = all_to_all(y), then sum the n chunks  backward: all-gather

(gloo has no reduce-scatter; the all-to-all form runs on gloo and NCCL alike, at the bandwidth of
the native collectives, with n copies of the input in memory.) A group of one rank is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in = _AllToAll.apply(grad_out.contiguous(), input_splits, output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(
    x_ND: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Differentiable all_to_all_single along dim 0 with uneven splits (lists of ints, one per
    rank of `group`): returns [sum(output_splits), ...], the rows received, ordered by source rank."""
    if dist.get_world_size(group) == 1:
        return x_ND
    return _AllToAll.apply(x_ND, list(output_splits), list(input_splits), group)


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Not differentiable. send_counts [n, ...] (row j: what this rank sends to rank j) -> the
    matching [n, ...] counts every rank sends to this one (row j: from rank j)."""
    if dist.get_world_size(group) == 1:
        return send_counts.clone()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def gather_sizes(rows: int, group: dist.ProcessGroup | None = None, device=None) -> list[int]:
    """The number of rows every rank of `group` holds, in group-rank order."""
    n = dist.get_world_size(group)
    if n == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def all_gather_rows(
    x_ND: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Differentiable all-gather of uneven row blocks: [sum(sizes), ...], rank j's rows j-th.
    `sizes` from gather_sizes. Backward: every rank's gradient for these rows, summed."""
    n = len(sizes)
    if n == 1:
        return x_ND
    rank = dist.get_rank(group)
    assert sizes[rank] == x_ND.shape[0], (sizes, x_ND.shape)
    repeated = x_ND.unsqueeze(0).expand(n, *x_ND.shape).reshape(-1, *x_ND.shape[1:])
    return all_to_all(repeated, sizes, [x_ND.shape[0]] * n, group)


def reduce_scatter_rows(
    y_MD: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Differentiable reduce-scatter (sum) of row blocks: y_MD holds sum(sizes) rows, block j for
    rank j; returns this rank's block summed over all ranks, [sizes[rank], ...]."""
    n = len(sizes)
    if n == 1:
        return y_MD
    mine = sizes[dist.get_rank(group)]
    received = all_to_all(y_MD, [mine] * n, sizes, group)
    return received.reshape(n, mine, *y_MD.shape[1:]).sum(dim=0)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Not differentiable: the sum of x over `group` (a new tensor)."""
    out = x.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
