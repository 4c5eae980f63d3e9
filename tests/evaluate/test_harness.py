"""MoeplatLM (the lm-evaluation-harness adapter) against scores computed here from the model's full
forward, and run_tasks on three local tasks against the same hand computation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_tasks import GEN, MC, MC_DOCS, PPL, PPL_DOCS, write_tasks

from moeplat.compile.model import build_model
from moeplat.data.tokenizers import ByteTok
from moeplat.evaluate.harness import MoeplatLM, UnknownTask, flat_results, run_tasks
from moeplat.evaluate.load import LoadedModel
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
L = 32  # tiny.yaml's model.max_seq_len


@pytest.fixture(scope="module")
def model():
    m = build_model(load_spec(TINY).spec).eval()  # initial weights: scores differ from token to token
    assert m.max_seq_len == L
    return m


def _ids(text: str) -> list[int]:
    return list(text.encode())


@torch.no_grad()
def _logp_rows(model, inp: list[int]) -> torch.Tensor:
    """log-softmax of one full forward of `inp` (alone, no batch, no padding): [S, V]."""
    logits = model(torch.tensor([inp])).logits_BSV[0]
    return torch.log_softmax(logits.double(), -1)


def _hand_loglik(model, context: str, continuation: str) -> float:
    """lm_eval's convention by hand for the byte tokenizer: trailing spaces of the context move to
    the continuation, the input is the last L tokens before the last continuation token."""
    n_spaces = len(context) - len(context.rstrip())
    ctx, cont = context[: len(context) - n_spaces], context[len(context) - n_spaces :] + continuation
    whole = _ids(ctx + cont)
    n = len(_ids(cont))
    start = max(0, len(whole) - 1 - L)
    rows = _logp_rows(model, whole[start:-1])
    return sum(rows[p - start - 1, whole[p]].item() for p in range(len(whole) - n, len(whole)))


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_the_sum_of_log_softmax_at_the_continuation(model):
    pairs = [
        ("def add(a, b):", " return a"),
        ("x =", " 1"),
        ("print ", "('hi')"),  # trailing space moves to the continuation
        ("import os\n" * 5, "os.path"),  # longer than max_seq_len: left-truncated
        ("a", "bcdefghij"),
    ]
    lm = MoeplatLM(model, ByteTok(), batch_size=2)  # batches of unequal lengths: padding
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (logp, _) in zip(pairs, got, strict=True):
        assert logp == pytest.approx(_hand_loglik(model, c, x), abs=1e-4)
    one_by_one = MoeplatLM(model, ByteTok(), batch_size=1).loglikelihood(
        [_req("loglikelihood", c, x) for c, x in pairs]
    )
    assert [g for g, _ in got] == pytest.approx([g for g, _ in one_by_one], abs=1e-4)


def test_is_greedy_on_the_models_own_greedy_continuation(model):
    context = "def add(a, b)"  # no trailing space: it would move into the continuation
    ids = _ids(context)
    for _ in range(4):  # the model's argmax continuation, by full forwards here
        ids.append(int(_logp_rows(model, ids[-L:])[-1].argmax()))
    greedy = bytes(ids[len(_ids(context)) :]).decode("latin-1")
    assert all(b < 128 for b in ids)  # plain ASCII: decoded text re-encodes to the same bytes
    other = greedy[:-1] + chr((ord(greedy[-1]) + 1) % 128)
    lm = MoeplatLM(model, ByteTok())
    (lp_g, is_g), (lp_o, is_o) = lm.loglikelihood(
        [_req("loglikelihood", context, greedy), _req("loglikelihood", context, other)]
    )
    assert is_g and not is_o
    assert lp_g > lp_o


def test_rolling_loglikelihood_is_the_sum_over_disjoint_windows(model):
    text = PPL_DOCS[0]["text"]
    t = _ids(text)
    assert len(t) > 2 * L
    u = [ByteTok.eos_id, *t]  # the first window is conditioned on eot
    hand = 0.0
    for a in range(0, len(t), L):  # window predicting t[a:b] sees the L tokens before t[b-1]
        b = min(a + L, len(t))
        start = max(0, b - L)
        rows = _logp_rows(model, u[start:b])
        hand += sum(rows[j - start, u[j + 1]].item() for j in range(a, b))
    lm = MoeplatLM(model, ByteTok(), batch_size=3)
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text), _req("loglikelihood_rolling", "ab")])
    assert got[0] == pytest.approx(hand, abs=1e-3)
    short = _logp_rows(model, [0, ord("a")])
    assert got[1] == pytest.approx(short[0, ord("a")].item() + short[1, ord("b")].item(), abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_until(model):
    context = "def f"
    ids = _ids(context)
    for _ in range(6):
        ids.append(int(_logp_rows(model, ids[-L:])[-1].argmax()))
    greedy = bytes(ids[len(_ids(context)) :]).decode("utf-8", "replace")
    lm = MoeplatLM(model, ByteTok())
    (full,) = lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 6})])
    assert full == greedy
    stop = greedy[3]
    (cut,) = lm.generate_until([_req("generate_until", context, {"until": [stop], "max_gen_toks": 6})])
    assert cut == greedy[: greedy.index(stop)]
    # a context longer than the window keeps its last max_seq_len - max_gen_toks tokens (as HFLM)
    long = "import os\n" * 5
    ids = _ids(long)[-(L - 6) :]
    for _ in range(6):
        ids.append(int(_logp_rows(model, ids)[-1].argmax()))
    (got,) = lm.generate_until([_req("generate_until", long, {"until": [], "max_gen_toks": 6})])
    assert got == bytes(ids[L - 6 :]).decode("utf-8", "replace")


def test_flat_results_drops_the_default_filter_and_keeps_stderr():
    raw = {
        "t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 8},
        "g": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
    }
    assert flat_results(raw) == {
        "t": {"acc": 0.5, "acc_stderr": 0.1},
        "g": {"exact_match/strict-match": 0.25},
    }


def test_run_tasks_on_local_tasks_matches_the_hand_computation(model, tmp_path):
    include = write_tasks(tmp_path)
    loaded = LoadedModel(spec=None, model=model, tok=ByteTok())
    res = run_tasks(loaded, [MC, PPL, GEN], include_path=str(include), batch_size=4, device="cpu")
    assert set(res) == {MC, PPL, GEN}
    # multiple choice: lm_eval asks for (question, " " + choice); acc = share of argmax == label
    right = [
        max(range(3), key=lambda k: _hand_loglik(model, d["q"], " " + d["choices"][k])) == d["label"]
        for d in MC_DOCS
    ]
    assert res[MC]["acc"] == pytest.approx(sum(right) / len(right))
    assert "acc_stderr" in res[MC]
    # bits per byte: -(sum of rolling log-likelihoods) / (bytes * ln 2)
    lm = MoeplatLM(model, ByteTok())
    texts = [d["text"] for d in PPL_DOCS]
    total = sum(lm.loglikelihood_rolling([_req("loglikelihood_rolling", x) for x in texts]))
    n_bytes = sum(len(x.encode()) for x in texts)
    assert res[PPL]["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-6)
    assert 0.0 <= res[GEN]["exact_match"] <= 1.0


def test_an_unknown_task_names_close_matches(model, tmp_path):
    include = write_tasks(tmp_path)
    loaded = LoadedModel(spec=None, model=model, tok=ByteTok())
    with pytest.raises(UnknownTask, match=r"unknown task 'tiny_mcc'.*close matches: tiny_mc"):
        run_tasks(loaded, ["tiny_mcc"], include_path=str(include))


def test_offline_switches_the_hub_off_and_restores_it(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from moeplat.evaluate.harness import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with offline():  # what datasets and huggingface_hub read when asked to download
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_equal_the_cpu_ones(model):
    reqs = [_req("loglikelihood", "def add(a, b):", " return a"), _req("loglikelihood", "x", " = 1")]
    cpu = MoeplatLM(model, ByteTok(), device="cpu").loglikelihood(reqs)
    gpu = MoeplatLM(model, ByteTok(), device="cuda").loglikelihood(reqs)
    model.to("cpu")
    assert [g for g, _ in gpu] == pytest.approx([c for c, _ in cpu], abs=1e-3)
