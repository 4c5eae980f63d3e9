"""Text generation from a TransformerLM: greedy or sampled (temperature, top-k, top-p), with a KV
cache (moeplat.nn.kv_cache) or by recomputing the whole prefix for every token (the slow
reference, kept: use_cache=False).

    gen = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)
    gen.tokens[0]          # the new token ids of prompt a (the eos that stopped it is not included)
    gen.tokens_per_s       # new tokens / wall seconds, prefill included

Prompts are generated one at a time, each as a batch of one: no padding, so every prompt's
positions start at 0 and its logits are exactly those of the model on that prompt alone (batched
left padding would need an attention mask through the cache for a small gain on a CPU).
A seed gives one torch.Generator for the whole call, drawn from in prompt order.

It lives in nn (pure torch) so that training (moeplat.train.samples) can use it; readers of
finished runs import it as moeplat.evaluate.generate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moeplat.nn.kv_cache import KVCache


class GenerationError(ValueError):
    """A request the model cannot serve (message names the setting to change)."""


@dataclass
class Generation:
    tokens: list[list[int]]  # the new token ids, per prompt
    stopped_at_eos: list[bool]  # per prompt: ended by eos_id rather than by max_new_tokens
    prompt_tokens: int  # over all prompts
    seconds: float  # wall time of the whole call (prefill and decoding)
    use_cache: bool

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def length_problem(prompt_len: int, max_new_tokens: int, max_seq_len: int, option: str) -> str | None:
    """Why a prompt of `prompt_len` tokens cannot get `max_new_tokens` more, naming `option`
    (a CLI flag or a spec field); None when it can. RoPE tables end at the model's max_seq_len."""
    if prompt_len < 1:
        return "the prompt is empty: give at least one token of text"
    if max_new_tokens < 1:
        return f"{option} must be >= 1, got {max_new_tokens}"
    if prompt_len + max_new_tokens > max_seq_len:
        room = max_seq_len - prompt_len
        fix = f"lower {option} to at most {room}" if room > 0 else "shorten the prompt"
        return (
            f"prompt ({prompt_len} tokens) + {option} ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"> the model's max_seq_len {max_seq_len}: {fix}"
        )
    return None


def filter_logits(
    logits_V: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits with the tokens outside the top-k and outside the nucleus set to -inf.

    top_k: the k highest logits (ties with the k-th kept). top_p (nucleus sampling, Holtzman et al.
    2020, "The curious case of neural text degeneration", sec. 3.1): the smallest set of most
    probable tokens whose probability sums to >= top_p, so the most probable token always stays.
    Applied in that order, after temperature, as transformers' TopK and TopP warpers are."""
    out = logits_V
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_V, order_V = torch.sort(out, dim=-1, descending=True)
        probs_V = torch.softmax(sorted_V, dim=-1)
        before_V = probs_V.cumsum(dim=-1) - probs_V  # mass of the more probable tokens
        drop_V = before_V >= top_p
        out = out.masked_fill(drop_V.scatter(-1, order_V, drop_V), float("-inf"))
    return out


def next_token(
    logits_V: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """Greedy (temperature 0: the argmax, top-k/top-p change nothing) or one sample."""
    logits_V = logits_V.float()
    if temperature == 0.0:
        return int(logits_V.argmax())
    probs_V = torch.softmax(filter_logits(logits_V / temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def _check(model, prompts: list[list[int]], max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompts:
        raise GenerationError("no prompts: give at least one")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    for i, ids in enumerate(prompts):
        problem = length_problem(len(ids), max_new_tokens, model.max_seq_len, "max_new_tokens")
        if problem:
            raise GenerationError(f"prompt {i}: {problem}")


@torch.no_grad()
def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """Continue each prompt (token ids) by up to `max_new_tokens` tokens; stop a prompt at
    `eos_id`. `on_token(prompt_index, token_id)` is called for every new token as it comes (not
    for the eos). The model runs in eval mode (its mode is restored after) on its own device."""
    prompts = [[int(t) for t in ids] for ids in prompt_ids]
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        results = [
            _one(
                model,
                ids,
                i,
                max_new_tokens,
                (temperature, top_k, top_p, generator),
                use_cache,
                eos_id,
                on_token,
            )
            for i, ids in enumerate(prompts)
        ]
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    return Generation(
        tokens=[r[0] for r in results],
        stopped_at_eos=[r[1] for r in results],
        prompt_tokens=sum(len(p) for p in prompts),
        seconds=seconds,
        use_cache=use_cache,
    )


def _one(model, ids, index, max_new_tokens, sampling, use_cache, eos_id, on_token) -> tuple[list[int], bool]:
    """One prompt: (new ids, stopped at eos). With the cache, the prompt is one prefill forward
    and each later step a forward of one token; without it, every step reruns the whole prefix."""
    device = next(model.parameters()).device
    seq_1S = torch.tensor([ids], dtype=torch.long, device=device)  # the next forward's input
    cache = KVCache(model.n_layers, len(ids) + max_new_tokens) if use_cache else None
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_1SV = model(seq_1S, cache=cache).logits_BSV
        token = next_token(logits_1SV[0, -1], *sampling)
        if token == eos_id:
            return new, True
        new.append(token)
        if on_token is not None:
            on_token(index, token)
        token_11 = torch.tensor([[token]], dtype=torch.long, device=device)
        seq_1S = token_11 if use_cache else torch.cat([seq_1S, token_11], dim=1)  # the next input
    return new, False
