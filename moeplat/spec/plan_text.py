"""Human-readable text of `moeplat plan`: counts (format_plan) and the layout preflight
(format_preflight). Shared by the command line and the server's /api/plan, which must print the same."""

from __future__ import annotations

import os

GiB = 1024**3


SI = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _n(x: float) -> str:
    """SI prefixes up to E: DeepSeek-V3's FLOP per optimizer step is 73.70E, not 73702360.35G."""
    for unit, div in SI:
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, div in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def _dispatch(spec) -> str:
    """The dispatch kind, with auto's choice: 'auto -> sorted'."""
    from moeplat.spec.moe import resolve_dispatch

    kind, built = spec.model.moe.dispatch.kind, resolve_dispatch(spec.model.moe, spec.train.compile)
    return kind if kind == built else f"{kind} -> {built}"


def _kernel(spec) -> str:
    """The attention kernel the activation estimate assumes (moeplat.spec.plan_memory)."""
    from moeplat.spec.plan_memory import attention_kernel

    where = {"auto": "planned as a GPU", "gpu": "GPU", "cpu": "CPU"}[spec.parallel.accelerator]
    if attention_kernel(spec) == "fused":
        return f"fused attention kernel ({where}: no S x S scores kept)"
    return f"math attention kernel ({where}: softmax(QK^T) kept, S x S per head)"


def format_plan(spec, p) -> str:
    m = spec.model
    moe = m.moe
    lines = [
        f"spec            {spec.name}",
        f"layers          {m.n_layers} (MoE: {p.moe_layers or 'none'})",
        f"vocabulary      {m.vocab_size:,} rows ({_vocab_origin(spec)})",
    ]
    if moe:
        lines.append(
            f"experts         {moe.num_experts} x {moe.experts.kind}(d_ff={moe.experts.d_ff}), top_k={moe.top_k}, "
            f"shared={moe.shared_experts.count}, router={moe.router.kind}{_nulls(moe)}, capacity={moe.capacity.kind}, "
            f"dispatch={_dispatch(spec)}"
        )
    lines += [
        f"total params    {_n(p.total_params)} ({p.total_params:,})",
        f"active params   {_n(p.active_params)} per token ({p.active_params / p.total_params:.1%} of total)",
        f"expert params   {_n(p.expert_params)} routed; embedding {_n(p.embedding_params)}",
        f"FLOPs/token     {_n(p.flops_per_token_fwd)} forward, {_n(p.flops_per_token_train)} train (fwd+bwd)",
    ]
    if p.expected_assumption:  # a varying number of experts per token: the counts above are its maximum
        lines += [
            f"expected        {_n(p.expected_active_params)} active params, "
            f"{_n(p.expected_flops_per_token_fwd)} FLOPs/token forward (the lines above: every top_k "
            f"slot used); {p.expected_assumption}",
        ]
    lines += [
        f"tokens/step     {p.tokens_per_step:,} -> {_n(p.flops_per_step_train)} FLOP per optimizer step",
        "memory (est.)   " + ", ".join(f"{k} {_bytes(v)}" for k, v in p.memory_bytes.items()),
        f"activations     per micro-batch of {spec.train.batch_size} x {spec.data.seq_len} tokens, "
        f"{_kernel(spec)}",
    ]
    return "\n".join(lines)


def _nulls(moe) -> str:
    n = getattr(moe.router, "null_experts", 0)
    return f" + {n} null experts" if n else ""


def _vocab_origin(spec) -> str:
    """The tokenizer's share of model.vocab_size (auto pads the tokenizer's size up, at validation)."""
    tok = spec.data.tokenizer
    size = {"byte": "256 ids", "bpe": f"at most {getattr(tok, 'vocab_size', 0):,} ids"}
    return f"{tok.kind} tokenizer: {size.get(tok.kind, 'its file')}; ids above it are never produced"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_preflight(spec, pf) -> str:
    par = spec.parallel
    s = par.strategy
    detail = {k: v for k, v in s.model_dump().items() if k != "kind"}
    lines = [
        f"layout          {par.devices} device(s) x {par.num_nodes} node(s) = world {pf.world_size}, "
        f"strategy {s.kind}"
        + (f" {detail}" if detail else "")
        + (", activation checkpointing" if par.activation_checkpointing else ""),
        f"global batch    {pf.global_batch} sequences/step "
        f"({spec.train.batch_size} per device x {spec.train.grad_accum} accum x {pf.world_size})",
        "memory/device   " + ", ".join(f"{k} {_gib(v)}" for k, v in pf.memory_bytes.items()),
        "comm/device     "
        + ", ".join(f"{k} {_gib(v)}" for k, v in pf.comm_bytes_per_step.items())
        + " sent per optimizer step",
    ]
    return "\n".join(lines)


def format_sweep(loaded, why: str | None, r) -> str:
    """`moeplat plan` of a sweep file: what it was read as (`why`: the key that made it a sweep;
    None when the caller said it is one), and the range of the counts over its search space
    (SweepRange from moeplat.spec.sweep_plan)."""
    how = "every combination of" if r.exhaustive else "one parameter at a time over"
    read_as = f" (read as a sweep file: it has `{why}`)" if why else ""
    lines = [
        f"sweep           {loaded.sweep.name}{read_as}, base {os.path.normpath(loaded.base_path)}",
        f"search space    {len(loaded.sweep.search)} parameters; planned {r.points} trial specs, {how} "
        "each range's ends and every categorical choice",
    ]
    if r.invalid:
        lines.append(f"invalid         {r.invalid} of them are refused by the run spec (such trials fail)")
    if r.over_constraint:
        lines.append(f"constraints     reject {r.over_constraint} of them before training")
    labels = {
        "active_params": "active params",
        "total_params": "total params",
        "flops_per_token_train": "FLOPs/token",
    }
    for metric, label in labels.items():
        if metric in r.low:
            lo, hi = r.low[metric], r.high[metric]
            lines.append(f"{label:<16}{_n(lo.value)} .. {_n(hi.value)}")
            if metric == "active_params":
                lines.append(f"  min at        {_point(lo.point)}")
                lines.append(f"  max at        {_point(hi.point)}")
    return "\n".join(lines)


def _point(point: dict) -> str:
    from moeplat.spec.sweep import to_override_text

    return ", ".join(f"{k}={to_override_text(v)}" for k, v in point.items()) or "(the base spec)"
