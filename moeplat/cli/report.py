"""Human-readable text of a finished run (the plan's is moeplat.spec.plan_text)."""

from __future__ import annotations


def format_summary(spec, r) -> str:
    lines = [f"\nrun finished: {spec.name}, {r.steps} steps in {r.wall_s:.0f} s"]
    if r.val_loss is not None:
        verdict = "beats" if r.val_loss < r.unigram_baseline else "does NOT beat"
        lines.append(
            f"  val loss {r.val_loss:.4f} nats/token {verdict} the unigram baseline {r.unigram_baseline:.4f} "
            f"(delta {r.unigram_baseline - r.val_loss:+.4f})"
        )
    if getattr(r, "val_bpb", None) is not None:
        base = r.unigram_baseline_bpb
        against = f" (unigram baseline {base:.4f})" if base is not None else ""
        lines.append(f"  val bpb  {r.val_bpb:.4f} bits/byte{against}: comparable across tokenizers")
    if r.tokens_per_s:
        lines.append(f"  throughput {r.tokens_per_s:,.0f} tokens/s")
    lines.append(f"  run dir    {r.run_dir}   (resume: --resume {r.run_dir})")
    if r.run_id and r.run_id.startswith("local-"):  # moeplat.track.spool: started with the server away
        lines.append(f"  MLflow run not created yet: {r.tracking_uri} was away; `moeplat sync {r.run_dir}`")
    elif r.run_id:
        lines.append(f"  MLflow run {r.run_id} at {r.tracking_uri}")
        if r.tracking_uri.startswith("sqlite:///"):
            lines.append(
                f"  view it:   mlflow ui --backend-store-uri {r.tracking_uri}   then open http://127.0.0.1:5000"
            )
        else:
            lines.append(f"  view it:   open the MLflow UI of {r.tracking_uri}")
    return "\n".join(lines)
