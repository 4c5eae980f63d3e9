"""The JSON Schema that editors use: every section, `extends`, no unknown keys, `kind` discriminators."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from moeplat.spec import Spec, load_spec
from moeplat.spec.schema import json_schema

# run specs; sweep specs (specs/sweeps/) are loaded by tests/sweep/test_sweep_spec.py
SPECS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "specs").rglob("*.yaml") if "sweeps" not in p.parts
)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json_schema()


def _deref(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def _objects(node):
    """Every sub-schema that declares properties."""
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def test_top_level_has_extends_and_every_section(schema):
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["type"] == "object"
    assert list(schema["properties"]) == ["extends", *Spec.model_fields]
    assert set(Spec.model_fields) >= {"name", "model", "data", "train", "tracking", "parallel"}
    assert schema["properties"]["extends"]["type"] == "string"
    assert sorted(schema["required"]) == ["data", "model", "name", "train"]


def test_every_object_forbids_additional_properties(schema):
    objects = list(_objects(schema))
    assert len(objects) > 20  # the root and every $defs model
    for node in objects:
        assert node.get("additionalProperties") is False, node.get("title")


@pytest.mark.parametrize(
    ("section", "field", "tags"),
    [
        (
            "MoESpec",
            "router",
            {"topk", "switch", "noisy_topk", "gshard", "hash", "random", "sigmoid_bias", "group_limited"}
            | {"sinkhorn", "expert_choice", "reinforce", "top_p"},
        ),
        ("MoESpec", "capacity", {"dropless", "factor"}),
        ("MoESpec", "dispatch", {"loop", "sorted", "capacity", "auto"}),
        ("MoESpec", "layers", {"all", "every", "first_dense", "list"}),
        ("MoESpec", "experts", {"swiglu", "geglu", "gelu", "relu"}),
        (
            "DataSpec",
            "source",
            {"python_stdlib", "text_files", "python_docs", "hf_dataset", "mixture", "prepared"},
        ),
        ("DataSpec", "tokenizer", {"byte", "bpe", "hf"}),
        ("TrainSpec", "optimizer", {"adamw"}),
        ("TrainSpec", "schedule", {"warmup_cosine", "constant"}),
        ("ParallelSpec", "strategy", {"single", "ddp", "fsdp", "expert_parallel"}),
    ],
)
def test_choices_are_discriminated_by_kind(schema, section, field, tags):
    prop = schema["$defs"][section]["properties"][field]
    assert prop["discriminator"]["propertyName"] == "kind"
    mapping = prop["discriminator"]["mapping"]
    assert set(mapping) == tags
    assert sorted(m["$ref"] for m in prop["oneOf"]) == sorted(mapping.values())
    for tag, ref in mapping.items():
        variant = _deref(schema, {"$ref": ref})
        assert variant["properties"]["kind"]["const"] == tag
        assert "kind" in variant["required"]


def _unknown_keys(schema: dict, node: dict, value, path: str = ""):
    """Keys of `value` the schema has no property for (a light check, not a validator)."""
    node = _deref(schema, node)
    if "discriminator" in node and isinstance(value, dict):
        node = _deref(schema, {"$ref": node["discriminator"]["mapping"][value["kind"]]})
    elif "anyOf" in node:  # Optional[...]: follow the object branch
        objects = [_deref(schema, n) for n in node["anyOf"] if _deref(schema, n).get("type") == "object"]
        node = objects[0] if objects and isinstance(value, dict) else node
    if not isinstance(value, dict) or "properties" not in node:
        return
    for key, sub in value.items():
        if key not in node["properties"]:
            yield f"{path}{key}"
        else:
            yield from _unknown_keys(schema, node["properties"][key], sub, f"{path}{key}.")


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_schema_knows_every_key_the_example_specs_use(schema, spec_file):
    resolved = load_spec(spec_file).resolved
    assert list(_unknown_keys(schema, schema, resolved)) == []
    # and the walk really looks, through discriminated unions too
    broken = copy.deepcopy(resolved)
    broken["model"]["d_modle"] = 1
    broken["data"]["source"]["max_byte"] = 1
    broken["train"]["schedule"]["warmup_step"] = 1
    found = list(_unknown_keys(schema, schema, broken))
    assert found == ["model.d_modle", "data.source.max_byte", "train.schedule.warmup_step"]


def test_schema_walk_reaches_into_the_moe_section(schema):
    resolved = copy.deepcopy(
        load_spec(Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml").resolved
    )
    resolved["model"]["moe"]["router"]["normalise"] = True
    resolved["model"]["moe"]["losses"]["z_loss"]["coeff"] = 1
    found = list(_unknown_keys(schema, schema, resolved))
    assert found == ["model.moe.router.normalise", "model.moe.losses.z_loss.coeff"]


def test_scalars_also_accept_an_interpolation(schema):
    """Editors must not flag `seq_len: ${model.max_seq_len}` in the example specs."""
    seq_len = schema["$defs"]["DataSpec"]["properties"]["seq_len"]
    kinds = [alt.get("type") for alt in seq_len["anyOf"]]
    assert kinds == ["integer", "string"]
    assert re.fullmatch(seq_len["anyOf"][1]["pattern"], "${model.max_seq_len}")
    assert not re.fullmatch(seq_len["anyOf"][1]["pattern"], "128")
