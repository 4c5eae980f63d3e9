"""`--set dotted.key=value` overrides: typed values, strings kept as strings, errors with origins."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.spec import load_spec
from moeplat.spec.data_section import TextFilesSource

SPECS = Path(__file__).resolve().parents[2] / "specs"
QUICKSTART = SPECS / "quickstart.yaml"


def _spec(*overrides: str):
    return load_spec(QUICKSTART, list(overrides)).spec


def test_values_are_typed_by_yaml_rules():
    spec = _spec(
        "model.moe.top_k=1",
        "train.optimizer.lr=1e-3",  # a float under OmegaConf's rules (plain YAML 1.1 reads a string)
        "model.tie_embeddings=false",
        "model.n_kv_heads=null",
        "train.optimizer.betas=[0.8, 0.99]",
    )
    assert spec.model.moe.top_k == 1 and type(spec.model.moe.top_k) is int
    assert spec.train.optimizer.lr == 1e-3 and type(spec.train.optimizer.lr) is float
    assert spec.model.tie_embeddings is False
    assert spec.model.n_kv_heads is None and spec.model.kv_heads == spec.model.n_heads == 4
    assert spec.train.optimizer.betas == (0.8, 0.99)


def test_a_mapping_value_replaces_a_section():
    spec = _spec("data.source={kind: text_files, paths: [corpus]}")
    assert spec.data.source == TextFilesSource(kind="text_files", paths=["corpus"])


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("name=123", "name", "123"),
        ("name=1e3", "name", "1e3"),
        ("description=true", "description", "true"),
        ("description=null", "description", "null"),  # not optional: the text "null"
        ("tracking.experiment=2024", "experiment", "2024"),
        ("tracking.uri=null", "uri", None),  # optional: null unsets it
    ],
)
def test_string_fields_keep_the_text_given(override, field, value):
    spec = _spec(override)
    got = getattr(spec.tracking, field) if override.startswith("tracking.") else getattr(spec, field)
    assert got == value


def test_later_override_wins_and_overrides_are_recorded():
    loaded = load_spec(QUICKSTART, ["model.moe.top_k=1", "model.moe.top_k=3"])
    assert loaded.spec.model.moe.top_k == 3
    assert loaded.overrides == ["model.moe.top_k=1", "model.moe.top_k=3"]


def test_override_feeds_interpolations_in_the_file():
    # quickstart says data.seq_len: ${model.max_seq_len}
    assert _spec("model.max_seq_len=64").data.seq_len == 64


def test_override_value_may_interpolate():
    assert _spec("model.moe.top_k=${model.n_heads}").model.moe.top_k == 4


def test_hash_follows_the_resolved_spec_not_the_flags():
    base = load_spec(QUICKSTART).spec_hash
    assert load_spec(QUICKSTART, ["model.moe.top_k=4"]).spec_hash == base  # the value it already had
    assert load_spec(QUICKSTART, ["model.moe.top_k=1"]).spec_hash != base


def test_list_item_by_index():
    spec = _spec("data.source={kind: text_files, paths: [a, b, c]}", "data.source.paths.1=z")
    assert spec.data.source.paths == ["a", "z", "c"]
    spec = _spec("train.optimizer.betas=[0.8, 0.9]", "train.optimizer.betas.0=0.5")
    assert spec.train.optimizer.betas == (0.5, 0.9)


def test_list_index_out_of_range(issues_of):
    text = "data.source.paths.3=z"
    (issue,) = issues_of(QUICKSTART, ["data.source={kind: text_files, paths: [a, b]}", text])
    assert (issue.path, issue.file, issue.line) == ("data.source.paths.3", f"--set {text}", None)
    assert "list index out of range (length 2)" in issue.message


@pytest.mark.parametrize(
    ("override", "path", "suggestion"),
    [
        ("nmae=x", "nmae", "name"),
        ("modle.d_model=64", "modle", "model"),
        ("model.d_modle=64", "model.d_modle", "d_model"),
        ("model.moe.topk=1", "model.moe.topk", "top_k"),
        ("model.moe.routr.kind=topk", "model.moe.routr", "router"),
        ("model.moe.router.normalise=false", "model.moe.router.normalise", "normalize"),
        ("model.moe.losses.z_loss.coeff=0.1", "model.moe.losses.z_loss.coeff", "coef"),
        ("data.source.max_byte=10", "data.source.max_byte", "max_bytes"),
        ("train.optimzer.lr=0.1", "train.optimzer", "optimizer"),
        ("train.schedule.warmup_step=3", "train.schedule.warmup_step", "warmup_steps"),
        ("tracking.experimnt=x", "tracking.experimnt", "experiment"),
        ("parallel.acelerator=cpu", "parallel.acelerator", "accelerator"),
    ],
)
def test_unknown_key_at_any_depth(override, path, suggestion, issues_of):
    (issue,) = issues_of(QUICKSTART, [override])
    assert (issue.path, issue.file, issue.line) == (path, f"--set {override}", None)
    assert issue.message == "unknown key"
    assert issue.hint == f"did you mean '{suggestion}'?"


def test_bad_value_from_an_override_points_at_the_override(issues_of):
    (issue,) = issues_of(QUICKSTART, ["model.moe.top_k=0"])
    assert (issue.path, issue.file, issue.line) == ("model.moe.top_k", "--set model.moe.top_k=0", None)
    assert (
        issue.format() == "--set model.moe.top_k=0: model.moe.top_k: Input should be greater than 0 (got 0)"
    )


def test_unknown_kind_from_an_override(issues_of):
    (issue,) = issues_of(QUICKSTART, ["model.moe.router.kind=topc"])
    assert (issue.path, issue.file) == ("model.moe.router.kind", "--set model.moe.router.kind=topc")
    assert issue.hint == "did you mean 'topk'?"


@pytest.mark.parametrize("override", ["no_equals_sign", "=3", " =3"])
def test_malformed_override(override, issues_of):
    (issue,) = issues_of(QUICKSTART, [override])
    assert (issue.path, issue.file) == ("", f"--set {override}")
    assert "dotted.key=value" in issue.message


def test_override_into_a_scalar(issues_of):
    (issue,) = issues_of(QUICKSTART, ["model.d_model.x=3"])
    assert (issue.path, issue.message) == ("model.d_model", "is a value, not a section")


def test_every_bad_override_is_reported_at_once(issues_of):
    issues = issues_of(QUICKSTART, ["modle.x=1", "no_equals_sign", "train.optimzer.lr=1"])
    assert [i.file for i in issues] == [
        "--set modle.x=1",
        "--set no_equals_sign",
        "--set train.optimzer.lr=1",
    ]


def test_null_removes_moe_and_then_dense_ffn_is_required(issues_of):
    (issue,) = issues_of(QUICKSTART, ["model.moe=null"])
    assert issue.path == "model.dense_ffn"
    assert "dense_ffn" in issue.message


def test_overrides_reproduce_the_dense_counterpart_spec():
    dense = load_spec(SPECS / "quickstart-dense.yaml")
    via_set = load_spec(
        QUICKSTART,
        [
            "model.moe=null",
            "model.dense_ffn={kind: swiglu, d_ff: 512}",
            f"name={dense.spec.name}",
            f"description={dense.spec.description}",
        ],
    )
    assert via_set.spec.model.moe_layers == []
    assert via_set.spec == dense.spec
    assert via_set.spec_hash == dense.spec_hash
