"""`moeplat generate RUN --prompt TEXT`: a trained model continues text, streamed as it comes.

RUN is whatever moeplat.evaluate.load accepts (a run id, a run directory, a .ckpt, a model/
directory). Greedy by default; --temperature, --top-k, --top-p sample (moeplat.nn.generate).
--log appends the samples to the run's MLflow table samples/generate.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def _usage_problem(args) -> str | None:
    if (args.prompt is None) == (args.prompts is None):
        return "give one of --prompt TEXT or --prompts FILE"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if args.temperature < 0:
        return f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1] (the nucleus's probability mass), got {args.top_p}"
    return None


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file (one prompt per line)")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompt in it (one prompt per line, blank lines skipped)")
    return prompts


class _Stream:
    """Prints a completion as its tokens come. A byte-level token may be part of a UTF-8 character:
    text that ends in U+FFFD is held back until the character is complete (or the end)."""

    def __init__(self, tok, out=None):
        self.tok, self.out = tok, out or sys.stdout  # looked up now: tests and pagers replace it
        self.ids: list[int] = []
        self.shown = 0

    def token(self, _prompt: int, token: int) -> None:
        self.ids.append(token)
        self._show(self.tok.decode(self.ids).rstrip(REPLACEMENT))

    def finish(self) -> None:
        self._show(self.tok.decode(self.ids) if self.ids else "")

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


def _generate_all(args, loaded, ids: list[list[int]], prompts: list[str]):
    """One prompt at a time, streamed unless --json: (completions, their Generation results)."""
    from moeplat.evaluate.generate import generate

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    results = []
    for i, (prompt_ids, prompt) in enumerate(zip(ids, prompts, strict=True)):
        stream = None if args.json else _Stream(loaded.tok)
        if stream is not None:
            print(("\n" if i else "") + prompt, end="", flush=True)
        gen = generate(
            loaded.model,
            [prompt_ids],
            max_new_tokens=args.max_new_tokens,
            seed=None if args.seed is None else args.seed + i,
            use_cache=not args.no_cache,
            eos_id=loaded.tok.eos_id,
            on_token=stream.token if stream is not None else None,
            **sampling,
        )
        if stream is not None:
            stream.finish()
            print()
        results.append(gen)
    return [loaded.tok.decode(g.tokens[0]) for g in results], results


def cmd_generate(args) -> int:
    import torch

    from moeplat.evaluate.generate import length_problem
    from moeplat.evaluate.load import ModelNotFound, load_trained

    try:
        problem = _usage_problem(args)
        prompts = [] if problem else _prompts(args)
    except ValueError as e:
        problem = str(e)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        loaded = load_trained(args.run, args.tracking_uri)
    except ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.log and not (loaded.run_id and loaded.tracking_uri):
        print(f"error: --log needs the model's MLflow run; {loaded.source} names none", file=sys.stderr)
        return 2
    ids = [a.tolist() for a in loaded.tok.encode_texts(prompts)]
    for i, prompt_ids in enumerate(ids):
        problem = length_problem(
            len(prompt_ids), args.max_new_tokens, loaded.model.max_seq_len, "--max-new-tokens"
        )
        if problem:
            print(f"error: prompt {i + 1}: {problem}", file=sys.stderr)
            return 2
    loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
    completions, results = _generate_all(args, loaded, ids, prompts)
    new = sum(g.new_tokens for g in results)
    seconds = sum(g.seconds for g in results)
    settings = {
        k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "no_cache")
    }
    if args.log:
        _log(loaded, prompts, completions, settings)
    speed = new / seconds if seconds > 0 else float("inf")
    if args.json:
        samples = [
            {"prompt": p, "completion": c, "new_tokens": g.new_tokens, "stopped_at_eos": g.stopped_at_eos[0]}
            for p, c, g in zip(prompts, completions, results, strict=True)
        ]
        out = {"source": loaded.source, "run_id": loaded.run_id, "step": loaded.meta.get("step")}
        out |= {"settings": settings, "samples": samples, "new_tokens": new, "seconds": seconds}
        print(json.dumps({**out, "tokens_per_s": speed}, indent=2))
        return 0
    cache = "no cache: the whole prefix recomputed per token" if args.no_cache else "KV cache"
    print(f"\n{new} new tokens in {seconds:.2f} s: {speed:.1f} tokens/s ({cache})")
    return 0


def _log(loaded, prompts: list[str], completions: list[str], settings: dict) -> None:
    from moeplat.track.tables import append_table

    n = len(prompts)
    data = {
        "prompt": prompts,
        "completion": completions,
        "step": [loaded.meta.get("step")] * n,
        "settings": [json.dumps(settings)] * n,
    }
    append_table(loaded.tracking_uri, loaded.run_id, data, "samples/generate.json")
    print(f"logged {n} sample(s) to run {loaded.run_id} as samples/generate.json", file=sys.stderr)


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="continue text with a trained model (KV cache, streamed)")
    p.add_argument("run", metavar="RUN", help="MLflow run id, run directory, .ckpt or model/ directory")
    p.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="sample from the k most probable tokens only")
    p.add_argument(
        "--top-p", type=float, help="nucleus sampling: the smallest set with this probability mass"
    )
    p.add_argument("--seed", type=int, help="seed of the sampling (prompt i uses seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix per token (reference)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    p.add_argument("--json", action="store_true", help="print the samples and speed as JSON (no streaming)")
    p.add_argument(
        "--log", action="store_true", help="append the samples to the run's table samples/generate.json"
    )
    p.set_defaults(fn=cmd_generate)
