"""The data section of `moeplat bench`: ratios measured in one process run.

- prepare throughput per worker vs the limit, Hugging Face `tokenizers`' own batch encoder
  (`encode_batch_fast`, one thread) on the same documents (target >= 0.8x);
- prepare with 2 workers vs 1 (target >= 1.6x, where two cores are free);
- data-loading wait as a fraction of a quick-start training step, the batches read from memmapped
  shards (target <= 1%);
- peak RSS of a short `moeplat run` on a prepared corpus of >= 1 GB of tokens vs the same run on a
  10 MB one (target: within 100 MB). The text is the standard library's, repeated to the size.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from moeplat.data.corpus import python_stdlib_documents, split_documents
from moeplat.data.prepare import SourceSplits, prepare
from moeplat.data.shards import FORMAT, Shard, write_manifest, write_shard
from moeplat.data.tokenizers import ByteTok, train_bpe

MiB = 2**20


@contextmanager
def _one_thread():
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float, object]:
    w0, c0 = time.perf_counter(), _cpu_s()
    out = fn()
    return time.perf_counter() - w0, _cpu_s() - c0, out


def prepare_throughput(
    tmp: Path, *, max_bytes: int = 12 * MiB, vocab_size: int = 4096, repeats: int = 2
) -> dict:
    """Tokens/s of `tokenizers`' encode_batch_fast (one thread), of prepare with 1 worker and with 2,
    on the same standard-library documents and BPE; each the best of `repeats`, interleaved so that a
    busy moment of a shared machine hits all three. Also per CPU-second (this process and its
    workers), which a shared machine's scheduling does not move: a worker's own efficiency."""
    docs = python_stdlib_documents(max_bytes=max_bytes)
    train, val = split_documents(docs, val_fraction=0.05, seed=0)
    tok = train_bpe(train[: max(len(train) // 8, 1)], vocab_size=vocab_size, cache_dir=tmp / "cache")
    texts = [d.data.decode("utf-8", errors="replace") for d in docs]
    shard_bytes = max(sum(len(d.data) for d in docs) // 24, 64 * 1024)
    wall: dict[str, list[float]] = {"limit": [], "1": [], "2": []}
    cpu: dict[str, list[float]] = {"limit": [], "1": [], "2": []}
    tokens = written = 0
    for r in range(repeats):
        with _one_thread():
            w, c, encs = _timed(lambda: tok.tok.encode_batch_fast(texts, add_special_tokens=False))
        tokens = sum(len(e.ids) for e in encs)
        wall["limit"].append(w)
        cpu["limit"].append(c)
        for workers in (1, 2):
            out = tmp / f"prepared-{workers}-{r}"
            job = partial(
                prepare, [SourceSplits("main", train, val)], tok, tok.vocab_size, out, workers=workers,
                shard_bytes=shard_bytes, progress=False,
            )  # fmt: skip
            w, c, result = _timed(job)
            written = result.tokens_written
            wall[str(workers)].append(w)
            cpu[str(workers)].append(c)
    rate = {k: (tokens if k == "limit" else written) / min(v) for k, v in wall.items()}
    per_cpu = {k: (tokens if k == "limit" else written) / min(v) for k, v in cpu.items()}
    return {
        "documents": len(docs),
        "text_mib": sum(len(d.data) for d in docs) / MiB,
        "vocab_size": tok.vocab_size,
        "limit_tokens_per_s": rate["limit"],
        "prepare_1_tokens_per_s": rate["1"],
        "prepare_2_tokens_per_s": rate["2"],
        "per_worker_vs_limit": rate["1"] / rate["limit"],
        "two_vs_one": rate["2"] / rate["1"],
        "limit_tokens_per_cpu_s": per_cpu["limit"],
        "prepare_1_tokens_per_cpu_s": per_cpu["1"],
        "prepare_2_tokens_per_cpu_s": per_cpu["2"],
        "per_worker_vs_limit_cpu": per_cpu["1"] / per_cpu["limit"],
        "two_workers_cpu_efficiency": per_cpu["2"] / per_cpu["1"],
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def repeated_corpus(
    root: Path, train_tokens: int, *, val_docs: int = 40, shard_tokens: int = 64 * MiB
) -> Path:
    """A complete prepared directory (byte tokens) whose training split is the standard library's
    text repeated until it holds `train_tokens` tokens; written shard by shard, never whole in memory."""
    tok = ByteTok()
    docs = python_stdlib_documents()
    train, val = split_documents(docs, val_fraction=0.05, seed=0)
    unit = tok.encode_documents(train)
    reps = -(-shard_tokens // unit.size)
    block = np.tile(np.concatenate([unit, np.frombuffer(tok.separator, np.uint8)]), reps)[:shard_tokens]
    shards, left, k = [], train_tokens, 0
    while left > 0:
        n = min(left, shard_tokens)
        shards.append(write_shard(root, f"main/train/{k:05d}", [block[:n]], np.uint8, 256, n).to_dict())
        left, k = left - n, k + 1
    v = tok.encode_documents(val[:val_docs])
    vshard = write_shard(root, "main/val/00000", [v], np.uint8, 256, v.size).to_dict()
    write_manifest(
        root,
        {
            "format": FORMAT, "complete": True, "dtype": "uint8", "vocab_size": 256, "shard_bytes": 0,
            "fingerprint": {"sources": f"stdlib-repeated-{train_tokens}", "tokenizer": tok.fingerprint},
            "tokenizer": {"kind": "byte", "fingerprint": tok.fingerprint, "size": 256, "file": None},
            "separator": list(tok.separator),
            "sources": {"main": {"documents": {"train": len(shards), "val": 1},
                                 "shards": {"train": shards, "val": [vshard]}}},
        },
    )  # fmt: skip
    assert Shard(**shards[0]).tokens > 0
    return root


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child started
# by a large parent would report the parent's peak.
_RSS_CHILD = (
    "import sys\n"
    "from moeplat.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
    "print('PEAK_RSS_KIB', hwm.split()[1], file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def peak_rss_of_run(spec: Path, workdir: Path) -> int:
    """Peak resident bytes of `moeplat run SPEC` in a fresh process."""
    cmd = [
        sys.executable, "-c", _RSS_CHILD, "run", str(spec), "--no-progress",
        "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--runs-dir", str(workdir / "runs"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"moeplat run {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KIB"))
    return int(line.split()[1]) * 1024


def _run_spec(path: Path, base: str, corpus: Path, steps: int) -> Path:
    path.write_text(
        f"extends: {Path(base).resolve()}\nname: rss\n"
        f"data:\n  source: {{kind: prepared, path: '{corpus}'}}\n"
        f"train: {{max_steps: {steps}, val_every: {steps}, schedule: {{kind: constant}}}}\n"
        "parallel: {accelerator: cpu}\n"
    )
    return path


def rss_growth(
    tmp: Path, base_spec: str, *, big_tokens: int = 2**30, small_tokens: int = 10 * MiB, steps: int = 20
) -> dict:
    """Peak RSS of the same short run on a small and on a big prepared corpus."""
    small = repeated_corpus(tmp / "small", small_tokens, shard_tokens=min(small_tokens, 64 * MiB))
    big = repeated_corpus(tmp / "big", big_tokens)
    out = {}
    for name, corpus in (("small", small), ("big", big)):
        work = tmp / f"run-{name}"
        work.mkdir()
        out[f"{name}_peak_rss_mib"] = (
            peak_rss_of_run(_run_spec(work / "spec.yaml", base_spec, corpus, steps), work) / MiB
        )
    out["big_tokens"], out["small_tokens"] = big_tokens, small_tokens
    out["rss_growth_mib"] = out["big_peak_rss_mib"] - out["small_peak_rss_mib"]
    return out


def data_wait(base_spec: str, corpus: Path, *, steps: int = 30, warmup: int = 3) -> dict:
    """Time spent waiting for the next batch (memmapped shards, the spec's loader) vs the whole
    step, over `steps` plain training steps of `base_spec`'s model."""
    import torch

    from moeplat.compile.data import build_data
    from moeplat.compile.model import build_model
    from moeplat.compile.optim import build_optimizer
    from moeplat.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec_file = _run_spec(Path(tmp) / "spec.yaml", base_spec, corpus, steps + warmup)
        spec = load_spec(spec_file).spec
    dm, _ = build_data(spec)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec).train()
    opt = build_optimizer(spec.train, model)
    batches = iter(dm.train_dataloader())
    wait = total = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            wait, total = wait + (t1 - t0), total + (time.perf_counter() - t0)
    return {
        "wait_ms_per_step": wait / steps * 1e3,
        "step_ms": total / steps * 1e3,
        "wait_fraction": wait / total,
    }


def data_bench(
    base_spec: str,
    *,
    rss: bool = True,
    big_tokens: int = 2**30,
    max_bytes: int = 12 * MiB,
    wait_tokens: int = 64 * MiB,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="moeplat-bench-data-") as tmp:
        tmp = Path(tmp)
        result = {"prepare": prepare_throughput(tmp, max_bytes=max_bytes)}
        corpus = repeated_corpus(tmp / "wait", wait_tokens, shard_tokens=min(wait_tokens, 64 * MiB))
        result["wait"] = data_wait(base_spec, corpus)
        if rss:
            result["rss"] = rss_growth(tmp, base_spec, big_tokens=big_tokens)
    return result


def format_data(r: dict) -> str:
    p, w = r["prepare"], r["wait"]
    lines = [
        "",
        f"== data: prepare {p['text_mib']:.1f} MiB of stdlib text, BPE vocab {p['vocab_size']}, {p['cpus']} CPUs",
        f"tokenizers encode_batch_fast, 1 thread   {p['limit_tokens_per_s'] / 1e6:7.2f}M tokens/s  (the limit)",
        f"prepare, 1 worker                         {p['prepare_1_tokens_per_s'] / 1e6:7.2f}M tokens/s  "
        f"{p['per_worker_vs_limit']:.2f}x the limit (target >= 0.8x)",
        f"prepare, 2 workers                        {p['prepare_2_tokens_per_s'] / 1e6:7.2f}M tokens/s  "
        f"{p['two_vs_one']:.2f}x 1 worker (target >= 1.6x with 2 free cores; load avg {p['load_avg_1m']:.1f})",
        f"per CPU-second: 1 worker {p['per_worker_vs_limit_cpu']:.2f}x the limit's, "
        f"2 workers {p['two_workers_cpu_efficiency']:.2f}x 1 worker's (pool start and transfer overhead)",
        f"data-loading wait (memmapped shards)      {w['wait_ms_per_step']:7.3f} ms of a {w['step_ms']:.1f} ms step  "
        f"{w['wait_fraction']:.2%} (target <= 1%)",
    ]
    if "rss" in r:
        s = r["rss"]
        lines.append(
            f"peak RSS of a short run                   {s['small_peak_rss_mib']:7.1f} MiB on {s['small_tokens'] / 2**20:.0f} Mi tokens, "
            f"{s['big_peak_rss_mib']:.1f} MiB on {s['big_tokens'] / 2**30:.2f} Gi tokens: "
            f"{s['rss_growth_mib']:+.1f} MiB (target within 100 MB)"
        )
    return "\n".join(lines)
