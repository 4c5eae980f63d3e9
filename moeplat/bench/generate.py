"""Generation speed: tokens/s of greedy decoding with the KV cache vs recomputing the whole prefix
for every token (moeplat.nn.generate's reference path), and vs transformers' `generate` on the
same weights exported by moeplat.interop.hf_model, all measured here in one process.

The model is the quick-start spec's shape with model.max_seq_len raised (128 -> 512 by default)
so that a prompt and 256 new tokens fit; random weights (speed does not depend on training).
Every candidate generates exactly `new_tokens` tokens (no eos; transformers gets min_new_tokens).
"""

from __future__ import annotations

import time

import torch

from moeplat.compile.model import build_model
from moeplat.nn.generate import generate
from moeplat.spec import load_spec


def generation_bench(
    spec_file: str,
    new_tokens: int = 256,
    prompt_tokens: int = 32,
    max_seq_len: int = 512,
    device: str = "cpu",
    hf: bool = True,
) -> dict:
    """Seconds and tokens/s per candidate, the cache's speed-up and transformers' ratio; the
    model's max_seq_len is `max_seq_len`, or prompt + new tokens where that is more."""
    max_seq_len = max(max_seq_len, prompt_tokens + new_tokens)
    spec = load_spec(spec_file, [f"model.max_seq_len={max_seq_len}"]).spec
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    prompt = torch.randint(0, spec.model.vocab_size, (prompt_tokens,)).tolist()
    out = {
        "spec": spec_file,
        "max_seq_len": max_seq_len,
        "spec_max_seq_len": load_spec(spec_file).spec.model.max_seq_len,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "device": device,
    }
    rows, tokens = {}, {}
    for name, use_cache in (("moeplat:kv_cache", True), ("moeplat:no_cache", False)):
        generate(model, [prompt], max_new_tokens=4, use_cache=use_cache)  # warm-up
        gen = generate(model, [prompt], max_new_tokens=new_tokens, use_cache=use_cache)
        rows[name], tokens[name] = gen.seconds, gen.tokens[0]
    if hf:
        rows["transformers:generate"], tokens["transformers:generate"] = _hf(
            model, prompt, new_tokens, device
        )
    out["rows"] = [
        {
            "candidate": k,
            "seconds": s,
            "tokens_per_s": new_tokens / s if s else None,
            "note": _note(k, tokens),
        }
        for k, s in rows.items()
    ]
    out["cache_speedup"] = rows["moeplat:no_cache"] / rows["moeplat:kv_cache"]
    hf_s = rows.get("transformers:generate")
    out["hf_over_moeplat"] = hf_s / rows["moeplat:kv_cache"] if hf_s else None
    return out


def _note(name: str, tokens: dict) -> str:
    if name == "moeplat:kv_cache":
        return ""
    if tokens[name] and isinstance(tokens[name][0], str):  # why the candidate was skipped
        return tokens[name][0]
    same = tokens[name] == tokens["moeplat:kv_cache"]
    return "same tokens as moeplat:kv_cache" if same else "tokens differ (float32 near-ties)"


def _hf(model, prompt: list[int], new_tokens: int, device: str) -> tuple[float | None, list[int]]:
    """transformers' greedy generate (use_cache=True) on the exported model; (None, []) when the
    model's family cannot be exported or transformers is missing."""
    try:
        from moeplat.interop.hf_model import to_hf_model

        _, hf_model = to_hf_model(model)
    except Exception as e:  # Unsupported family, no transformers: the row is skipped, not the bench
        return None, [str(e)[:80]]
    hf_model = hf_model.to(device)
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf_model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        seq = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        seconds = time.perf_counter() - t0
    return seconds, seq[0, len(prompt) :].tolist()


def format_generation(g: dict) -> str:
    lines = [
        "",
        f"== generation: {g['spec']} model shape, model.max_seq_len raised {g['spec_max_seq_len']} -> "
        f"{g['max_seq_len']} for this bench, random weights, float32, {g['device']}",
        f"greedy, prompt {g['prompt_tokens']} tokens, {g['new_tokens']} new tokens (prefill included)",
        f"{'candidate':<24} {'seconds':>8} {'tokens/s':>9}  note",
    ]
    for r in g["rows"]:
        if r["seconds"] is None:
            lines.append(f"{r['candidate']:<24} {'skipped':>8} {'-':>9}  {r['note']}")
            continue
        lines.append(f"{r['candidate']:<24} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f}  {r['note']}")
    lines.append(f"KV cache vs recomputing the prefix: {g['cache_speedup']:.2f}x faster (target >= 5x)")
    if g["hf_over_moeplat"] is not None:
        lines.append(f"transformers generate / moeplat KV cache, time: {g['hf_over_moeplat']:.2f}x")
    return "\n".join(lines)
