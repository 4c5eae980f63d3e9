"""Human-readable text for plan and run results."""

from __future__ import annotations


def _n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def _dispatch(spec) -> str:
    """The dispatch kind, with auto's choice: 'auto -> sorted'."""
    from moeplat.spec.moe import resolve_dispatch

    kind, built = spec.model.moe.dispatch.kind, resolve_dispatch(spec.model.moe, spec.train.compile)
    return kind if kind == built else f"{kind} -> {built}"


def format_plan(spec, p) -> str:
    m = spec.model
    moe = m.moe
    lines = [
        f"spec            {spec.name}",
        f"layers          {m.n_layers} (MoE: {p.moe_layers or 'none'})",
    ]
    if moe:
        lines.append(
            f"experts         {moe.num_experts} x {moe.experts.kind}(d_ff={moe.experts.d_ff}), top_k={moe.top_k}, "
            f"shared={moe.shared_experts.count}, router={moe.router.kind}, capacity={moe.capacity.kind}, "
            f"dispatch={_dispatch(spec)}"
        )
    lines += [
        f"total params    {_n(p.total_params)} ({p.total_params:,})",
        f"active params   {_n(p.active_params)} per token ({p.active_params / p.total_params:.1%} of total)",
        f"expert params   {_n(p.expert_params)} routed; embedding {_n(p.embedding_params)}",
        f"FLOPs/token     {_n(p.flops_per_token_fwd)} forward, {_n(p.flops_per_token_train)} train (fwd+bwd)",
        f"tokens/step     {p.tokens_per_step:,} -> {_n(p.flops_per_step_train)} FLOP per optimizer step",
        "memory (est.)   " + ", ".join(f"{k} {_bytes(v)}" for k, v in p.memory_bytes.items()),
    ]
    return "\n".join(lines)


def format_summary(spec, r) -> str:
    lines = [f"\nrun finished: {spec.name}, {r.steps} steps in {r.wall_s:.0f} s"]
    if r.val_loss is not None:
        verdict = "beats" if r.val_loss < r.unigram_baseline else "does NOT beat"
        lines.append(
            f"  val loss {r.val_loss:.4f} nats/token {verdict} the unigram baseline {r.unigram_baseline:.4f} "
            f"(delta {r.unigram_baseline - r.val_loss:+.4f})"
        )
    if r.tokens_per_s:
        lines.append(f"  throughput {r.tokens_per_s:,.0f} tokens/s")
    lines.append(f"  run dir    {r.run_dir}   (resume: --resume {r.run_dir})")
    if r.run_id:
        lines.append(f"  MLflow run {r.run_id} at {r.tracking_uri}")
        if r.tracking_uri.startswith("sqlite:///"):
            lines.append(
                f"  view it:   mlflow ui --backend-store-uri {r.tracking_uri}   then open http://127.0.0.1:5000"
            )
        else:
            lines.append(f"  view it:   open the MLflow UI of {r.tracking_uri}")
    return "\n".join(lines)
