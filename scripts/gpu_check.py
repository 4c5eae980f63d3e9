"""The in-process parts of scripts/gpu-check.sh; each subcommand writes OUT/<name>.json.

env OUT DEVICE        python, torch, CUDA, the device, and whether torch._grouped_mm is taken
dispatch OUT DEVICE   sorted dispatch (grouped GEMM where it works) == the loop reference, fwd+bwd
runs OUT              the eager and compiled runs read back from OUT/eager.db, OUT/compile.db
summary OUT           every OUT/*.json and OUT/steps.tsv into OUT/results.json and OUT/summary.txt
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _write(out: Path, name: str, data: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print(json.dumps(data, indent=2, default=str))


def env(out: Path, device: str) -> None:
    import torch

    from moeplat.nn.dispatch import _grouped_mm_works
    from moeplat.nn.experts import SwiGLUExperts

    dev = torch.device(device)
    experts = SwiGLUExperts(8, 256, 512)
    data = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        # the probe moeplat.nn.dispatch runs before taking torch._grouped_mm (d=256, f=512)
        "grouped_mm": {
            str(dt).removeprefix("torch."): _grouped_mm_works(experts, dev, dt)
            for dt in (torch.bfloat16, torch.float32)
        },
    }
    if dev.type == "cuda":
        data["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        data["memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    _write(out, "env", data)


def dispatch(out: Path, device: str) -> None:
    """dispatch_sorted against dispatch_loop on the device, float32 and bfloat16: output and every
    gradient (tolerance: float32 round-off, bf16's 8 bits of mantissa)."""
    import torch

    from moeplat.nn import SwiGLUExperts, dispatch_loop, dispatch_sorted
    from moeplat.nn.dispatch import _GROUPED_MM_OK

    dev, T, D, F, E, K = torch.device(device), 512, 128, 256, 8, 2
    results, ok = {}, True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        torch.manual_seed(0)
        experts = SwiGLUExperts(E, D, F).to(dev, dtype)
        x = torch.randn(T, D, device=dev, dtype=dtype)
        idx = torch.rand(T, E, device=dev).argsort(dim=-1)[:, :K]
        w = torch.rand(T, K, device=dev)
        keep = torch.ones(T, K, dtype=torch.bool, device=dev)
        outs = []
        for fn in (dispatch_sorted, dispatch_loop):
            experts.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = fn(experts, xi, idx, w, keep)
            y.float().square().sum().backward()
            outs.append([y, xi.grad, *(p.grad for p in experts.parameters())])
        worst = max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
            for a, b in zip(*outs, strict=True)
        )
        name = str(dtype).removeprefix("torch.")
        grouped = _GROUPED_MM_OK.get((str(x.device), dtype, D, F), False)  # the key the probe used
        results[name] = {"max_rel_diff": worst, "tolerance": tol, "grouped_mm": grouped}
        ok &= worst <= tol
    _write(out, "dispatch", {"device": device, "ok": ok, **results})
    sys.exit(0 if ok else 1)


def _run_figures(client, run) -> dict:
    def history(key: str) -> list[float]:
        ms = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        return [m.value for m in ms]

    tps, mfu, loss = history("perf/tokens_per_s"), history("perf/mfu"), history("train/loss")
    later = tps[1:] or tps  # the first window holds start-up (and compilation)
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "tokens_per_s_median": statistics.median(later) if later else None,
        "tokens_per_s_first_window": tps[0] if tps else None,
        "mfu_median": statistics.median(mfu[1:] or mfu) if mfu else None,
        "train_loss": loss,
        "final_train_loss": loss[-1] if loss else None,
        "val_loss": (history("val/loss") or [None])[-1],
    }


def runs(out: Path) -> None:
    """The eager and compiled runs, each the one run of its store OUT/<name>.db."""
    from mlflow.tracking import MlflowClient

    by_name = {}
    for name in ("eager", "compile"):
        if not (out / f"{name}.db").exists():
            continue
        client = MlflowClient(f"sqlite:///{out / name}.db")
        found = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if found:
            by_name[name] = _run_figures(client, found[0])
    data = dict(by_name)
    eager, compiled = by_name.get("eager"), by_name.get("compile")
    if eager and compiled and eager["tokens_per_s_median"] and compiled["tokens_per_s_median"]:
        data["compile_over_eager_tokens_per_s"] = (
            compiled["tokens_per_s_median"] / eager["tokens_per_s_median"]
        )
        pairs = list(zip(eager["train_loss"], compiled["train_loss"], strict=False))
        data["compile_vs_eager_max_rel_loss_diff"] = max(
            (abs(a - b) / abs(a) for a, b in pairs), default=None
        )
    _write(out, "runs", data)


def summary(out: Path) -> None:
    steps = []
    tsv = out / "steps.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
            steps.append({"step": name, "status": status, "seconds": float(seconds), "note": note})
    results = {"steps": steps}
    for f in sorted(out.glob("*.json")):
        if f.name != "results.json":
            try:
                results[f.stem] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                results[f.stem] = {"unreadable": str(e)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"gpu-check results in {out}", ""]
    lines += [f"{s['step']:<12} {s['status']:<8} {s['seconds']:7.1f} s  {s['note']}" for s in steps]
    lines += _figures(results)
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text)


def _figures(results: dict) -> list[str]:
    lines = [""]
    e = results.get("env", {})
    if e:
        lines.append(f"device {e.get('device')}  torch {e.get('torch')} (CUDA {e.get('torch_cuda')})")
        lines.append(f"torch._grouped_mm taken: {e.get('grouped_mm')}")
    for row in results.get("bench", {}).get("layers", []):
        if row["candidate"].startswith("moeplat:sorted") and row.get("vs_dense"):
            hf = (
                f", transformers' best / sorted {row['hf_over_this']:.2f}x" if row.get("hf_over_this") else ""
            )
            lines.append(
                f"MoE layer sorted / dense  {row['vs_dense']:.2f}x{hf}  ({row['point']}, {row['dtype']})"
            )
    for row in results.get("bench", {}).get("memory", []):
        lines.append(f"plan / measured memory    {row['ratio']:.2f}x  ({row['spec']})")
    r = results.get("runs", {})
    for name in ("eager", "compile"):
        if name in r:
            x = r[name]
            mfu = f"{x['mfu_median']:.1%}" if x.get("mfu_median") is not None else "-"
            tps = x.get("tokens_per_s_median")
            lines.append(
                f"run {name:<8} tokens/s {tps and round(tps)}  MFU {mfu}  final loss {x['final_train_loss']}"
            )
    if "compile_over_eager_tokens_per_s" in r:
        lines.append(f"compile / eager tokens/s  {r['compile_over_eager_tokens_per_s']:.2f}x")
        lines.append(f"compile vs eager loss     max rel diff {r['compile_vs_eager_max_rel_loss_diff']:.2e}")
    return lines


if __name__ == "__main__":
    cmd, out = sys.argv[1], Path(sys.argv[2])
    {"env": env, "dispatch": dispatch, "runs": lambda o: runs(o), "summary": summary}[cmd](out, *sys.argv[3:])
