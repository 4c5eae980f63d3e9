"""Token dispatch: send each kept token-slot to its expert and combine the weighted results.

All dispatchers have one signature (capacity also takes the buffer size C) and compute the same function:

    y_TD[t] = sum over kept slots (t, k) of topk_weight_TK[t, k] * expert_{topk_idx_TK[t, k]}(x_TD[t])

`dispatch_loop` is the obviously-correct reference and stays forever (house principle 5);
`dispatch_sorted` (dropless, grouped GEMM) and `dispatch_capacity` (fixed [E, C, D] buffers, one
bmm per expert matrix, static shapes) are the fast paths and are tested against it. Combining is accumulated in at least
float32 (K contributions per token) and the result is cast back to x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeplat.nn.experts import MLPExperts, SwiGLUExperts
from moeplat.nn.profiling import COMBINE, EXPERTS, phase

__all__ = [
    "DISPATCHERS",
    "MLPExperts",
    "SwiGLUExperts",
    "dispatch_capacity",
    "dispatch_few",
    "dispatch_loop",
    "dispatch_sorted",
]


def dispatch_loop(
    experts: MLPExperts,
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    keep_TK: torch.Tensor,
) -> torch.Tensor:
    """Reference: one expert at a time, gather its kept (token, slot) pairs, scatter-add back."""
    acc = _accumulate_dtype(x_TD)
    y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    for e in range(experts.num_experts):
        token_N, slot_N = torch.where((topk_idx_TK == e) & keep_TK)
        if token_N.numel() == 0:
            continue
        out_ND = experts(x_TD[token_N], e)
        weight_N1 = topk_weight_TK[token_N, slot_N].to(acc).unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_N, out_ND.to(acc) * weight_N1)
    return y_TD.to(x_TD.dtype)


def dispatch_sorted(
    experts: MLPExperts,
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    *,
    static: bool | None = None,
) -> torch.Tensor:
    """Dropless-style fast path (MegaBlocks, Gale et al. 2022, sec. 5 without block sparsity).

    Kept slots are sorted by expert id (stable, so token order is kept within an expert), x is
    gathered once into contiguous per-expert segments, all experts run as one grouped GEMM (or a
    loop over segments where grouped GEMM is unavailable), and one index_add combines.

    `static` (default: under torch.compile) keeps every shape a function of T*K alone, so the
    compiler traces it without graph breaks or host syncs: all T*K slots are sorted, dropped ones
    after the kept ones (a sentinel expert E); they ride at the end of the last expert's segment
    and their output is zeroed, so segment offsets stay a device tensor (cumsum of counts). Kept
    rows, their order and their segments are those of the compact path: the same numbers
    (dropless, exactly). Each dropped or invalid slot is an extra row of the last GEMM: none
    dropless, many with expert choice (T x E slots, most invalid: dispatch_capacity suits it).
    Eager takes the compact path (nonzero: one host sync), which computes no row for them.
    """
    K, E = topk_idx_TK.shape[1], experts.num_experts
    kept_N1 = None
    if static is None:
        static = torch.compiler.is_compiling()
    if static:
        expert_N = torch.where(keep_TK.reshape(-1), topk_idx_TK.reshape(-1), E)  # N = T*K
        expert_N, slot_N = torch.sort(expert_N, stable=True)
        kept_N1 = (expert_N < E).unsqueeze(-1)
        counts_E = _segment_counts(expert_N.clamp_max(E - 1), E)  # dropped rows: the last segment
    else:
        slot_N = keep_TK.reshape(-1).nonzero().squeeze(-1)  # flat index t*K + k of each kept slot
        expert_N = topk_idx_TK.reshape(-1)[slot_N]
        expert_N, order_N = torch.sort(expert_N, stable=True)
        slot_N = slot_N[order_N]
        counts_E = torch.bincount(expert_N, minlength=E)
    token_N = slot_N // K

    # index_select rather than x_TD[token_N]: same rows, but its backward is one index_add where
    # advanced indexing's is an accumulating index_put (measured ~15% slower on CPU, issue 9).
    x_ND = x_TD.index_select(0, token_N)
    acc = _accumulate_dtype(x_TD)
    weight_N1 = topk_weight_TK.reshape(-1)[slot_N].unsqueeze(-1)
    # The combine weight scales an expert's output, w (h W_down) = (w h) W_down: applied to the
    # hidden [N, F] when F <= D, it is the smaller multiply, forward and backward (measured -9% of
    # the layer's fwd+bwd at d=256 f=128 E=64 k=8 on CPU, issue 9), else to the output [N, D].
    with phase(EXPERTS):  # (the sort and gather above are the enclosing dispatch range's)
        if experts.d_ff <= experts.d_model:
            out_ND = _segmented_mlp(experts, x_ND, counts_E, weight_N1).to(acc)
        else:
            out_ND = _segmented_mlp(experts, x_ND, counts_E).to(acc)
    with phase(COMBINE):
        if kept_N1 is not None:  # a where, not a product: a dropped row adds an exact 0, grads too
            out_ND = torch.where(kept_N1, out_ND, 0.0)
        if experts.d_ff > experts.d_model:
            out_ND = out_ND * weight_N1.to(acc)
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
        return y_TD.index_add(0, token_N, out_ND).to(x_TD.dtype)


def dispatch_capacity(
    experts: MLPExperts,
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    capacity: int | None = None,
) -> torch.Tensor:
    """Fixed-capacity buffers (GShard, Lepikhin et al. 2020, Algorithm 1; Switch, Fedus et al. 2021
    sec. 2.2): every expert gets C rows of an [E, C, D] buffer, all experts run as one bmm per
    expert matrix, and each kept slot reads its row back.

    Which slots fit is the keep mask's decision (moeplat.nn.capacity.capacity_keep_mask with the
    same C), so the output equals dispatch_loop's with that mask; a kept slot beyond C would be a
    silent drop, so it raises instead (checked in eager mode). `capacity` None sizes the buffer by
    the fullest expert. All shapes are static given C ([E*C] rows, [T*K] slots): no nonzero, no
    host sync when C is given, which is what torch.compile and accelerators like.
    """
    T, K = topk_idx_TK.shape
    E, M = experts.num_experts, T * K
    keep_M = keep_TK.reshape(-1)
    # Dropped slots go to a sentinel expert E, sorted after every real one.
    expert_M = torch.where(keep_M, topk_idx_TK.reshape(-1), E)
    expert_sorted_M, order_M = torch.sort(expert_M, stable=True)
    counts_E1 = torch.zeros(E + 1, dtype=torch.long, device=x_TD.device)
    counts_E1 = counts_E1.index_add(0, expert_M, torch.ones_like(expert_M))
    start_E1 = counts_E1.cumsum(0) - counts_E1
    pos_sorted_M = torch.arange(M, device=x_TD.device) - start_E1[expert_sorted_M]
    pos_M = torch.empty_like(pos_sorted_M).scatter_(0, order_M, pos_sorted_M)  # 0-based row in its expert
    if capacity is None:
        capacity = max(int(counts_E1[:E].max()), 1)
    elif not torch.compiler.is_compiling() and bool((counts_E1[:E] > capacity).any()):
        raise ValueError(f"the keep mask keeps more than capacity={capacity} slots for some expert")
    C = capacity
    # Buffer row of each slot; dropped (and, under compile, overflowing) slots read the zero row E*C.
    row_M = torch.where(keep_M & (pos_M < C), expert_M * C + pos_M, E * C)
    token_M = torch.arange(M, device=x_TD.device) // K
    src_R = torch.full((E * C + 1,), T, dtype=torch.long, device=x_TD.device)  # T = the zero row of x
    src_R = src_R.scatter(0, row_M, token_M)[: E * C]
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    out_ECD = _buffered_mlp(experts, x_pad[src_R].view(E, C, -1))
    acc = _accumulate_dtype(x_TD)
    out_R = torch.cat([out_ECD.reshape(E * C, -1), out_ECD.new_zeros(1, out_ECD.shape[-1])])
    y_TKD = out_R[row_M].to(acc).view(T, K, -1) * topk_weight_TK.to(acc).unsqueeze(-1)
    return y_TKD.sum(dim=1).to(x_TD.dtype)


def _segment_counts(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E] rows per expert id, a static shape (bincount's output size depends on the data,
    which breaks a compiled graph)."""
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_N.device)
    return counts_E.index_add(0, expert_N, torch.ones_like(expert_N))


def _buffered_mlp(experts: MLPExperts, x_ECD: torch.Tensor) -> torch.Tensor:
    """All experts on their [C, D] buffers at once: one bmm per matrix ([E, C, D] @ [E, D, F])."""
    gate_ECF = torch.bmm(x_ECD, experts.w_gate) if experts.w_gate is not None else None
    return torch.bmm(experts.hidden(gate_ECF, torch.bmm(x_ECD, experts.w_up)), experts.w_down)


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (K partial sums per token), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _segmented_mlp(
    experts: MLPExperts, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N1: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of x_ND are grouped by expert, counts_E[e] rows for expert e; returns [N, D], each row
    scaled by weight_N1 when given (applied to the hidden activation on the grouped-GEMM path).

    Plain (non-GLU) experts have no gate matrix, so its GEMM is skipped on both paths. Both paths
    take the hidden activation from experts.hidden (expert dropout included), as dispatch_loop does.

    torch._grouped_mm is taken wherever it works, the CPU included: there its kernel is a C++ loop
    of one GEMM per expert segment, which is what the Python loop does minus its overhead. Padding
    the segments to the fullest expert and running one bmm per matrix (as dispatch_capacity does)
    was measured slower on CPU float32 (issue 9; 1 and 2 threads, d=256, at f=512 E=8 k=2 and at
    f=128 E=64 k=8), even with loads even enough that padding added ~13% rows, so it is not used here.
    """
    dtype = _matmul_dtype(x_ND)
    gated = experts.w_gate is not None
    mm = _grouped_mm_op(experts, x_ND.device, dtype)
    if mm is not None:
        # Cast by hand what autocast would cast for a matmul; it may not know the private op.
        x, w_up, w_down = (t.to(dtype) for t in (x_ND, experts.w_up, experts.w_down))
        # end offset of each expert's segment: a device tensor, no host sync
        offs_E = counts_E.cumsum(0).to(torch.int32)
        g_NF = mm(x, experts.w_gate.to(dtype), offs_E) if gated else None
        u_NF = mm(x, w_up, offs_E)
        h_NF = experts.hidden(g_NF, u_NF)
        if weight_N1 is not None:
            h_NF = h_NF * weight_N1.to(dtype)
        return mm(h_NF, w_down, offs_E)
    out_ND = torch.cat([experts(chunk, e) for e, chunk in enumerate(x_ND.split(counts_E.tolist()))])
    return out_ND if weight_N1 is None else out_ND * weight_N1.to(out_ND.dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a plain matmul on x would compute in here: autocast's, if it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# (device, compute dtype, D, F) -> whether torch._grouped_mm works there, probed once.
_GROUPED_MM_OK: dict[tuple, bool] = {}


def _grouped_mm_op(experts: MLPExperts, device: torch.device, dtype: torch.dtype) -> GroupedMM | None:
    """The grouped GEMM _segmented_mlp runs, (x [N, K], w [E, K, F], offs [E]) -> [N, F]; None:
    the per-segment loop (eager only).

    Compiled, there is always one, so no segment size reaches the host: torch 2.13's fake (meta)
    kernel of torch._grouped_mm accepts bfloat16 only (its eager CPU kernel takes float32 too), so
    other dtypes go through moeplat::grouped_mm, a custom op opaque to the compiler that runs the
    eager kernel, or its own segment loop where that does not work (see grouped_mm).
    """
    if torch.compiler.is_compiling():
        return _native_grouped_mm if dtype == torch.bfloat16 else grouped_mm
    return _native_grouped_mm if _grouped_mm_works(experts, device, dtype) else None


def _native_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def _grouped_mm_works(experts: MLPExperts, device: torch.device, dtype: torch.dtype) -> bool:
    """Probe torch._grouped_mm once per configuration, forward and backward, on tiny inputs.

    It is a private op whose support varies by device, dtype (e.g. no float64 anywhere, only
    bfloat16 on CUDA), alignment (strides must be multiples of 16 bytes) and torch version, so we
    try it rather than predict it. Weights of a dtype other than the compute dtype are cast first.
    """
    return _grouped_mm_ok(device, dtype, experts.d_model, experts.d_ff)


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype, D: int, Fh: int) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    key = (str(device), dtype, D, Fh)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(D, Fh, device, dtype)
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(D: int, Fh: int, device: torch.device, dtype: torch.dtype) -> bool:
    offs = [0, 5, 16]  # an empty group and groups of unaligned length, as real routing produces
    try:
        # Identity saved-tensor hooks shadow any outer ones: the probe runs once per process, so
        # inside an activation-checkpointed block its saved tensors would make the forward and its
        # recomputation save different numbers of tensors (torch.utils.checkpoint.CheckpointError).
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            x = torch.randn(offs[-1], D, device=device, dtype=dtype, requires_grad=True)
            w_up = torch.randn(3, D, Fh, device=device, dtype=dtype, requires_grad=True)
            w_down = torch.randn(3, Fh, D, device=device, dtype=dtype, requires_grad=True)
            offs_t = torch.tensor(offs, device=device, dtype=torch.int32)
            y = torch._grouped_mm(F.silu(torch._grouped_mm(x, w_up, offs=offs_t)), w_down, offs=offs_t)
            ref = torch.cat([F.silu(x[0:5] @ w_up[1]) @ w_down[1], F.silu(x[5:] @ w_up[2]) @ w_down[2]])
            y.float().square().sum().backward()
            close = torch.allclose(y.float(), ref.float(), rtol=5e-2, atol=5e-2 * ref.abs().max().item())
            return close and x.grad is not None and w_down.grad is not None
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


@torch.library.custom_op("moeplat::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs) for 2-d x [N, K] whose rows are E segments ending at
    offs [E] (int32), w [E, K, F] -> [N, F], in any dtype and traceable (the compiler sees only
    its output shape, register_fake below). It runs the eager kernel where the probe says it
    works, else a loop over the segments (which reads offs on the host: a sync on an accelerator,
    inside the op, not a graph break). offs[-1] must be N (dispatch_sorted's always is): what the
    kernel writes to rows after it is not defined."""
    if _grouped_mm_ok(x.device, x.dtype, x.shape[1], w.shape[2]):
        return torch._grouped_mm(x, w, offs=offs).contiguous()
    out = x.new_zeros(x.shape[0], w.shape[2])
    for e, (start, end) in enumerate(_segments(offs)):
        out[start:end] = x[start:end] @ w[e]
    return out


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moeplat::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The gradient of grouped_mm's w: x_e^T dy_e per segment e, [E, K, F] (zeros for an empty one)."""
    if _grouped_mm_ok(x.device, x.dtype, x.shape[1], dy.shape[1]):
        return torch._grouped_mm(x.t(), dy, offs=offs).contiguous()
    return torch.stack([x[start:end].t() @ dy[start:end] for start, end in _segments(offs)])


@grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _segments(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, grad_NF: torch.Tensor):
    """As torch._grouped_mm's own backward: dx = dy w^T per segment, dw = x^T dy per segment."""
    x, w, offs = ctx.saved_tensors
    dx = grouped_mm(grad_NF, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_weight_grad(x, grad_NF, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Dispatcher = Callable[[MLPExperts, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dispatch_few(
    experts: MLPExperts,
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    keep_TK: torch.Tensor,
) -> torch.Tensor:
    """Few slots (a decoding step: T*K no more than E): one expert call per kept slot, on views of
    that expert's weights, instead of a pass over every expert (most of them empty) or a sort.
    The same function as dispatch_loop; MoELayer picks it by itself outside autograd. Reading
    the kept slots' experts costs one host sync, which a decoding step pays anyway."""
    acc = _accumulate_dtype(x_TD)
    y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    token_N, slot_N = keep_TK.nonzero(as_tuple=True)
    weight_N = topk_weight_TK[token_N, slot_N].to(acc)
    with phase(EXPERTS):
        for n, (t, e) in enumerate(zip(token_N.tolist(), topk_idx_TK[token_N, slot_N].tolist())):
            y_TD[t] += experts(x_TD[t : t + 1], e)[0].to(acc) * weight_N[n]
    return y_TD.to(x_TD.dtype)


DISPATCHERS: dict[str, Dispatcher] = {
    "loop": dispatch_loop,
    "sorted": dispatch_sorted,
    "capacity": dispatch_capacity,
}
