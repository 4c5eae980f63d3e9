"""MoE layer forward+backward against its dense equivalent and its transformers peer, in one process.

For one grid point (d_model D, expert width F, E experts, top-k K, shared hidden size S, T tokens)
the candidates are:

- `dense`: the dense-equivalent SwiGLU FFN, hidden size K*F + S: the same active FLOPs per token;
- `hf:<family>:<impl>`: the transformers block of the same structure (Mixtral without shared
  experts, Qwen2-MoE with a gated shared expert), with each experts implementation;
- `moeplat:<dispatch>`: MoELayer with each dispatcher; `capacity` runs at capacity factor
  CAPACITY_FACTOR and drops what does not fit (its drop fraction is reported with it).

Candidates run round by round (one fwd+bwd of each per round, so a noisy neighbour slows all of
them alike); after `warmup` rounds the median of `repeats` rounds is reported. Peak memory is
measured in one extra fwd+bwd: on CUDA by torch.cuda.max_memory_allocated, on CPU by the
torch.profiler memory timeline (what torch's CPU allocator handed out during the call, the
call's inputs and parameters included).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moeplat.interop.hf_configs import EXPERTS_IMPLEMENTATIONS, hf_peer, peer_family
from moeplat.nn import DenseFFN, MoELayer

DISPATCHES = ("loop", "sorted", "capacity")
CAPACITY_FACTOR = 1.25


@dataclass(frozen=True)
class Point:
    """One grid point: D, F, E, K, shared hidden size S (0 = none), T tokens."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    shared_d_ff: int = 0
    tokens: int = 4096

    @property
    def label(self) -> str:
        shared = f" S={self.shared_d_ff}" if self.shared_d_ff else ""
        return f"d={self.d_model} f={self.d_ff} E={self.num_experts} k={self.top_k}{shared} T={self.tokens}"


GRIDS = {
    "default": (Point(256, 512, 8, 2), Point(256, 128, 64, 8, 256)),
    "quick": (Point(32, 32, 8, 2, tokens=128), Point(32, 16, 16, 4, 32, tokens=128)),
}


@dataclass
class Row:
    point: str
    dtype: str
    candidate: str
    median_ms: float
    times_ms: list[float]
    peak_mib: float | None
    note: str = ""
    vs_dense: float | None = None  # this / dense
    hf_over_this: float | None = None  # best transformers / this (moeplat rows)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def moe_layer(p: Point, dispatch: str, seed: int = 0) -> MoELayer:
    """The MoE layer of a grid point: softmax top-k, SwiGLU experts, one gated shared expert of
    width S when S > 0 (Qwen2-MoE's structure, so that transformers has the same block)."""
    torch.manual_seed(seed)
    cf = CAPACITY_FACTOR if dispatch == "capacity" else None
    return MoELayer(
        p.d_model,
        p.num_experts,
        p.top_k,
        p.d_ff,
        n_shared_experts=1 if p.shared_d_ff else 0,
        shared_d_ff=p.shared_d_ff or None,
        shared_gate=bool(p.shared_d_ff),
        capacity_factor_train=cf,
        capacity_factor_eval=cf,
        dispatch=dispatch,
    )


def _output(out) -> torch.Tensor:
    """The hidden states of a dense FFN, an MoELayer or a transformers block's output."""
    if hasattr(out, "y"):
        return out.y
    return out[0] if isinstance(out, tuple) else out


def _step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    # a MoE layer computes its losses, as every training step does, but not the routing
    # statistics, which training computes only on the steps that log them (LMSystem)
    kw = {"stats": False} if isinstance(module, MoELayer) else {}

    def step() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        _output(module(xi, **kw)).backward(grad)

    return step


def candidates(p: Point, dtype: torch.dtype, device: torch.device, spec_layer: MoELayer | None = None):
    """(name, module, note) of every candidate at this point; a peer that cannot be built is noted."""
    out: list[tuple[str, nn.Module | None, str]] = []
    dense_hidden = p.top_k * p.d_ff + p.shared_d_ff
    out.append(("dense", DenseFFN(p.d_model, dense_hidden), f"SwiGLU hidden {dense_hidden}"))
    layers = {
        d: (spec_layer if spec_layer is not None and d == spec_layer.dispatch else None) for d in DISPATCHES
    }
    base = spec_layer if spec_layer is not None else moe_layer(p, "sorted")
    family = peer_family(base)
    for impl in EXPERTS_IMPLEMENTATIONS:
        name = f"hf:{family or 'none'}:{impl}"
        try:
            out.append((name, hf_peer(base, impl), ""))
        except (ValueError, ImportError, TypeError) as e:
            out.append((name, None, f"skipped: {str(e).splitlines()[0][:80]}"))
    for d in DISPATCHES:
        layer = layers[d] or _with_dispatch(base, d, p)
        if layer is None:
            out.append((f"moeplat:{d}", None, "skipped: needs a capacity factor"))
            continue
        out.append((f"moeplat:{d}", layer, f"cf={CAPACITY_FACTOR}" if d == "capacity" else ""))
    return [
        (n, m.to(device=device, dtype=dtype).train() if m is not None else None, note) for n, m, note in out
    ]


def _with_dispatch(base: MoELayer, dispatch: str, p: Point) -> MoELayer | None:
    """`base` with another dispatcher (same weights); capacity needs a capacity factor."""
    import copy

    layer = copy.deepcopy(base)
    if dispatch == "capacity" and layer.capacity_factor_train is None:
        layer.capacity_factor_train = layer.capacity_factor_eval = CAPACITY_FACTOR
    layer.dispatch = dispatch
    return layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _stderr_fd_silenced():
    """torch 2.13's kineto writes 'USDT: ... profiler_start/stop' to file descriptor 2 on every
    profile (no setting turns it off): two lines per candidate drowned the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        acts = [ProfilerActivity.CPU]
        with (
            _stderr_fd_silenced(),
            profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof,
        ):
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
        return max((sum(s) for s in sizes), default=0) / 2**20
    except Exception:  # a private API: no figure rather than no benchmark
        return None


def bench_point(
    p: Point,
    dtype: torch.dtype,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    spec_layer: MoELayer | None = None,
) -> list[Row]:
    """Time every candidate at one point, interleaved round by round; rows with ratios filled in."""
    g = torch.Generator().manual_seed(0)
    # [1, T, D]: transformers blocks take [B, S, D]; routing sees the same T tokens either way
    x = torch.randn(1, p.tokens, p.d_model, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(1, p.tokens, p.d_model, generator=g).to(device=device, dtype=dtype)
    cands = candidates(p, dtype, device, spec_layer)
    steps = {n: _step_fn(m, x, grad) for n, m, _ in cands if m is not None}
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for name, module, note in cands:
        if module is None:
            rows.append(Row(p.label, str(dtype).removeprefix("torch."), name, float("nan"), [], None, note))
            continue
        if isinstance(module, MoELayer) and module.dispatch == "capacity":
            with torch.no_grad():
                note = f"{note}, dropped {module(x).dropped_frac.item():.1%} of slots".lstrip(", ")
        med = statistics.median(times[name])
        rows.append(
            Row(
                p.label,
                str(dtype).removeprefix("torch."),
                name,
                med,
                times[name],
                peak_memory_mib(steps[name], device),
                note,
            )
        )
    return _ratios(rows)


def _ratios(rows: list[Row]) -> list[Row]:
    dense = next((r.median_ms for r in rows if r.candidate == "dense"), None)
    hf = [r.median_ms for r in rows if r.candidate.startswith("hf:") and r.times_ms]
    best_hf = min(hf) if hf else None
    for r in rows:
        if not r.times_ms:
            continue
        if dense and r.candidate != "dense":
            r.vs_dense = r.median_ms / dense
        if best_hf and r.candidate.startswith("moeplat:"):
            r.hf_over_this = best_hf / r.median_ms
    return rows
