"""`model.attention`: gqa (default) and mla, their cross-checks with the head counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.errors import SpecError
from moeplat.spec import load_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"
MLA = "model.attention={kind: mla, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}"


def _problems(*overrides) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        load_spec(QUICKSTART, list(overrides))
    return [(i.path, i.message) for i in err.value.issues]


def test_gqa_is_the_default():
    spec = load_spec(QUICKSTART).spec
    assert spec.model.attention.kind == "gqa" and spec.model.attention.head_dim is None


def test_mla_needs_no_kv_heads_and_an_even_rope_dim():
    problems = _problems(MLA.replace("qk_rope_head_dim: 4", "qk_rope_head_dim: 5"))
    assert [p for p, _ in problems] == ["model.n_kv_heads", "model.attention.qk_rope_head_dim"]
    assert "n_kv_heads: null" in problems[0][1] and "even" in problems[1][1]


def test_mla_does_not_need_d_model_divisible_by_heads():
    spec = load_spec(QUICKSTART, ["model.n_kv_heads=null", "model.n_heads=3", MLA]).spec
    assert spec.model.attention.kind == "mla" and spec.model.attention.q_lora_rank is None


def test_gqa_head_dim_lifts_the_divisibility_rule_but_must_be_even():
    assert load_spec(
        QUICKSTART, ["model.n_heads=6", "model.n_kv_heads=3", "model.attention={kind: gqa, head_dim: 16}"]
    )
    assert _problems("model.n_heads=6", "model.n_kv_heads=3")[0][0] == "model.n_heads"
    assert _problems("model.attention={kind: gqa, head_dim: 15}") == [
        ("model.attention.head_dim", "head dim 15 must be even for rotary embeddings")
    ]


def test_unknown_attention_kind_is_named():
    (path, message), *_ = _problems("model.attention={kind: mqa}")
    assert path.startswith("model.attention") and "gqa" in message and "mla" in message


def test_qk_norm_is_off_whole_or_per_head():
    for value, expected in (("false", False), ("true", True), ("head", "head")):
        spec = load_spec(QUICKSTART, [f"model.attention={{kind: gqa, qk_norm: {value}}}"]).spec
        assert spec.model.attention.qk_norm == expected
    problems = _problems("model.attention={kind: gqa, qk_norm: heads}")
    assert problems and all(p.startswith("model.attention") for p, _ in problems)
