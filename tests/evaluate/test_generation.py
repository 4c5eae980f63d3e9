"""moeplat.evaluate.generate: the KV-cache path gives the tokens of the recompute-everything
reference; sampling is seeded; top-k / top-p keep the hand-computed sets; bad requests are errors."""

from __future__ import annotations

import pytest
import torch

from moeplat.evaluate.generate import GenerationError, filter_logits, generate, length_problem, next_token
from moeplat.nn import DenseFFN, MoELayer, MultiHeadLatentAttention, TransformerLM

V, D = 64, 32


def _model(attn: str = "gqa", max_seq_len: int = 96, seed: int = 0) -> TransformerLM:
    """A random MoE model whose logits are spread out (init_std 0.3): greedy has no near-ties."""
    torch.manual_seed(seed)
    ffns = [MoELayer(D, 4, 2, 32), DenseFFN(D, 48)]
    attns = None
    if attn == "mla":
        kw = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=16)
        attns = [MultiHeadLatentAttention(D, 4, max_seq_len=max_seq_len, **kw) for _ in ffns]
    model = TransformerLM(V, D, 4, 2, max_seq_len, ffns, attns=attns, init_std=0.3)
    return model.double().eval()


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_greedy_with_the_cache_equals_recomputing_the_prefix(attn):
    model = _model(attn)
    prompts = [[1, 2, 3], list(range(10, 30))]
    cached = generate(model, prompts, max_new_tokens=64)
    slow = generate(model, prompts, max_new_tokens=64, use_cache=False)
    assert cached.tokens == slow.tokens
    assert [len(t) for t in cached.tokens] == [64, 64] and len(set(cached.tokens[0])) > 5
    assert cached.new_tokens == 128 and cached.prompt_tokens == 23 and cached.tokens_per_s > 0
    assert cached.use_cache and not slow.use_cache


def test_sampling_with_a_seed_is_reproducible_with_and_without_the_cache():
    model = _model()
    kw = dict(max_new_tokens=32, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, [[5, 6, 7], [8]], seed=3, **kw).tokens
    assert a == generate(model, [[5, 6, 7], [8]], seed=3, **kw).tokens
    assert a == generate(model, [[5, 6, 7], [8]], seed=3, use_cache=False, **kw).tokens
    assert a != generate(model, [[5, 6, 7], [8]], seed=4, **kw).tokens
    greedy = generate(model, [[5, 6, 7]], max_new_tokens=32).tokens[0]
    assert a[0] != greedy  # temperature 1 over a spread distribution: not the argmax path


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()  # probabilities 0.1 .. 0.4
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [2, 3]
    assert kept(filter_logits(logits, top_k=9)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.35)) == [3]  # 0.4 >= 0.35 alone
    assert kept(filter_logits(logits, top_p=0.65)) == [2, 3]  # 0.4 + 0.3 >= 0.65
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 2, 3]
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_k=3, top_p=0.65)) == [2, 3]
    out = filter_logits(logits, top_p=0.65)
    assert out[2] == logits[2] and out[3] == logits[3]  # the kept logits are unchanged
    # renormalised over the nucleus: 0.3 / 0.7 and 0.4 / 0.7
    probs = torch.softmax(out, dim=-1)
    assert probs[2].item() == pytest.approx(3 / 7) and probs[3].item() == pytest.approx(4 / 7)


def test_sampling_draws_only_from_the_filtered_set():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, 1.0, None, 0.65, g) for _ in range(200)}
    assert draws == {2, 3}
    assert {next_token(logits, 5.0, 1, None, g) for _ in range(20)} == {3}  # top_k 1 = greedy
    assert next_token(logits, 0.0, None, None, None) == 3


def test_eos_stops_a_prompt_and_on_token_streams_every_token():
    model = _model()
    first = generate(model, [[1, 2]], max_new_tokens=5).tokens[0]
    got = generate(model, [[1, 2]], max_new_tokens=5, eos_id=first[0])
    assert got.tokens == [[]] and got.stopped_at_eos == [True]
    seen = []
    gen = generate(model, [[1, 2], [3]], max_new_tokens=4, on_token=lambda i, t: seen.append((i, t)))
    assert (
        seen == [(i, t) for i, ts in enumerate(gen.tokens) for t in ts] and gen.stopped_at_eos == [False] * 2
    )


def test_the_model_mode_is_restored():
    model = _model().train()
    generate(model, [[1]], max_new_tokens=2)
    assert model.training


def test_bad_requests_name_the_setting():
    model = _model(max_seq_len=16)
    with pytest.raises(
        GenerationError,
        match=r"prompt 0: prompt \(10 tokens\) \+ max_new_tokens \(7\) = 17 > "
        r"the model's max_seq_len 16: lower max_new_tokens to at most 6",
    ):
        generate(model, [list(range(10))], max_new_tokens=7)
    with pytest.raises(GenerationError, match="prompt 1: the prompt is empty"):
        generate(model, [[1], []], max_new_tokens=1)
    with pytest.raises(GenerationError, match=r"top_p must be in \(0, 1\], got 1.5"):
        generate(model, [[1]], max_new_tokens=1, top_p=1.5)
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [[1]], max_new_tokens=0)
    for kw, msg in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k")]:
        with pytest.raises(GenerationError, match=msg):
            generate(model, [[1]], max_new_tokens=1, **kw)
    assert "shorten the prompt" in length_problem(16, 1, 16, "--max-new-tokens")
    assert length_problem(15, 1, 16, "--max-new-tokens") is None
