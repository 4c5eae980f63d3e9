"""Routing analysis (moeplat.evaluate.route): the table holds the routers' own decisions, window by
window, every token once; the top-token statistics are the hand counts; the HTML view escapes text."""

from __future__ import annotations

import re

import pytest
import torch

from moeplat.data.tokenizers import ByteTok
from moeplat.evaluate.route import (
    NoMoELayers,
    moe_layers,
    route_text,
    token_labels,
    token_pieces,
    top_tokens,
)
from moeplat.evaluate.route_html import render_html
from moeplat.nn.experts import DenseFFN
from moeplat.nn.model import TransformerLM
from moeplat.nn.moe import MoELayer
from moeplat.nn.routers import ExpertChoiceRouter, HashRouter

D, E, WINDOW = 16, 4, 8
TEXT = "def f(x):\n    return x + 1  # café!"  # 36 bytes: windows 8, 8, 8, 8, 4; é is two bytes


def _model(**capacity) -> TransformerLM:
    """Four blocks: top-2 softmax, dense, expert choice (0..E experts per token), hash (by token id)."""
    torch.manual_seed(0)
    ffns = [
        MoELayer(D, E, 2, 16, **capacity),
        DenseFFN(D, 16),
        MoELayer(D, E, 2, 16, router=ExpertChoiceRouter(D, E, 2, capacity_factor=0.5)),
        MoELayer(D, E, 1, 16, router=HashRouter(E, 256, seed=3)),
    ]
    model = TransformerLM(256, D, 2, 1, WINDOW, ffns, init_std=0.5)  # large init: routing varies
    return model.eval()


def _by_hand(model: TransformerLM, ids: list[int]) -> dict[int, list[set]]:
    """Per MoE layer, per token, the set of (expert, weight) its router assigned, computed here by
    running the blocks one by one and calling each router on its layer's normed input."""
    out: dict[int, list[set]] = {i: [] for i in moe_layers(model)}
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW):
            idx_BS = torch.tensor([ids[start : start + WINDOW]])
            x_BSD = model.tok_emb(idx_BS)
            for i, block in enumerate(model.blocks):
                if i in out:
                    h_BSD = x_BSD + block.attn(block.attn_norm(x_BSD))
                    route = block.ffn.router(block.ffn_norm(h_BSD).reshape(-1, D), idx_BS.reshape(-1))
                    valid_TK = route.valid_TK
                    for t in range(idx_BS.shape[1]):
                        out[i].append(
                            {
                                (int(e), round(float(w), 5))
                                for k, (e, w) in enumerate(zip(route.topk_idx_TK[t], route.topk_weight_TK[t]))
                                if valid_TK is None or valid_TK[t, k]
                            }
                        )
                x_BSD, _ = block(x_BSD, token_ids_BS=idx_BS)
    return out


def test_table_holds_each_routers_own_choice_and_weights():
    model, tok = _model(), ByteTok()
    table = route_text(model, tok, TEXT)
    ids = list(TEXT.encode())
    assert table.ids == ids and [lr.layer for lr in table.layers] == [0, 2, 3]
    expected = _by_hand(model, ids)
    for lr in table.layers:
        got = [
            {(e, round(w, 5)) for e, w in zip(ex, ws, strict=True)}
            for ex, ws in zip(lr.experts, lr.weights, strict=True)
        ]
        assert got == expected[lr.layer], f"layer {lr.layer}"
        assert all(ws == sorted(ws, reverse=True) for ws in lr.weights)  # heaviest first
        assert sum(lr.load) == pytest.approx(1.0)
    counts = [len(ex) for ex in table.layers[1].experts]  # expert choice: C = 2 of 8 tokens per expert
    assert 0 in counts and sum(counts[:WINDOW]) == E * 2
    assert table.layers[2].experts == [[int(model.blocks[3].ffn.router.table_V[t])] for t in ids]


def test_windows_route_every_token_once():
    model, tok = _model(), ByteTok()
    sizes = []
    hook = model.blocks[0].ffn.router.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    table = route_text(model, tok, TEXT)
    hook.remove()
    assert sizes == [8, 8, 8, 8, 4]
    assert all(len(lr.experts) == len(TEXT.encode()) for lr in table.layers)
    assert "".join(table.pieces) == TEXT
    i = TEXT.encode().index(0xC3)  # é = c3 a9: shown once, on its last byte
    assert table.pieces[i : i + 2] == ["", "é"]
    assert table.labels[0xC3] == "<c3>" and table.labels[ord("d")] == "d"

    short = route_text(model, tok, TEXT, max_tokens=10)
    assert short.truncated and short.ids == list(TEXT.encode())[:10]
    assert short.layers[0].experts == table.layers[0].experts[:10]  # same windows' first 10 tokens


def test_capacity_drops_are_listed_apart():
    model, tok = _model(capacity_factor_train=0.5, capacity_factor_eval=0.5), ByteTok()
    lr = route_text(model, tok, TEXT).layers[0]
    assert any(lr.dropped)
    # every token was routed to exactly 2 experts: those computed plus those dropped
    assert all(len(ex) + len(dr) == 2 for ex, dr in zip(lr.experts, lr.dropped, strict=True))


def test_a_dense_model_has_no_routing():
    model = TransformerLM(256, D, 2, 1, WINDOW, [DenseFFN(D, 16)])
    with pytest.raises(NoMoELayers, match="no MoE layer"):
        route_text(model, ByteTok(), "abc")


def test_top_tokens_equal_a_hand_count():
    # tokens a a a b b c (ids 1 1 1 2 2 3); expert 0 gets a, a, b, c; expert 1 gets a, b, b
    ids = [1, 1, 1, 2, 2, 3]
    experts = [[0], [0, 1], [1], [0, 1], [1], [0]]
    by_count, by_lift = top_tokens(ids, experts, 3, {1: "a", 2: "b", 3: "c"})
    # equal counts: the higher lift first (c is rarer than b overall)
    assert [(t.token, t.count) for t in by_count[0]] == [("a", 2), ("c", 1), ("b", 1)]
    assert [(t.token, t.count) for t in by_count[1]] == [("b", 2), ("a", 2)]
    # lift = (count / n_e) / (occurrences / N): expert 0, a: (2/4) / (3/6) = 1; b (1/4)/(2/6) = .75
    lift0 = {t.token: t.lift for t in by_count[0]}
    assert lift0 == pytest.approx({"a": 1.0, "b": 0.75, "c": 1.5})
    # expert 1: b (2/4)/(2/6) = 1.5, a (2/4)/(3/6) = 1; c was never routed there
    assert [(t.token, t.lift) for t in by_lift[1]] == [("b", pytest.approx(1.5)), ("a", pytest.approx(1.0))]
    assert [t.token for t in by_lift[0]] == ["a"]  # b and c went to expert 0 once: below MIN_LIFT_COUNT
    assert by_count[2] == [] and by_lift[2] == []


def test_html_has_one_span_per_token_and_escapes_the_text():
    text = 'x <script>alert("pwned")</script> & </script><b>bold</b>'
    table = route_text(_model(), ByteTok(), text)
    page = render_html(table)
    spans = re.findall(r'<span class="t[^"]*" data-i="(\d+)">', page)
    assert [int(i) for i in spans] == list(range(len(text.encode())))
    assert page.count("<script") == 2  # the data and the view's own code, nothing from the text
    assert "<b>" not in page and "&lt;script&gt;" not in page  # one token per byte: < is its own span
    assert '<span class="t" data-i="2">&lt;</span>' in page
    data = page.split('id="route-data">')[1].split("</script>")[0]
    assert "<" not in data and "\\u003c" in data  # the JSON cannot close its element
    assert page.count('<section class="layer"') == 3
    assert '<td class="tok">␣</td>' in page  # a space in the top-token tables shows


def test_byte_level_bpe_pieces_rebuild_the_text(tmp_path):
    from moeplat.data.corpus import Document
    from moeplat.data.tokenizers import train_bpe

    corpus = "naïve café 日本語 the the the 🙂 " * 20
    tok = train_bpe([Document("a.txt", corpus.encode())], vocab_size=300, cache_dir=tmp_path)
    text = "a 日本 🙂 café the<|endoftext|>"
    ids = [int(i) for i in tok.encode_texts([text])[0]]
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == text  # special-token spelling is text here, and every byte is kept
    labels = token_labels(tok, ids)
    # 300 symbols leave some of 日本 split mid-character: a token whose bytes end no character
    # shows "" in the text and its bytes in hex in the tables
    assert "" in pieces
    assert re.fullmatch(r"(<[0-9a-f]{2}>)+", labels[ids[pieces.index("")]])
    assert labels[ids[0]] == "a"
