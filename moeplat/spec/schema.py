"""JSON Schema of spec files, for editors (YAML language server) and the web UI."""

from __future__ import annotations

from moeplat.spec.root import Spec

# A `${...}` interpolation may stand wherever a value may: the loader resolves it before validation.
INTERPOLATION = {"type": "string", "pattern": r"^.*\$\{.+\}.*$", "description": "OmegaConf interpolation"}


def _allow_interpolation(node: object) -> None:
    """Let every scalar-typed property also accept an interpolation string, so editors do not
    flag `seq_len: ${model.max_seq_len}`."""
    if isinstance(node, dict):
        for prop in node.get("properties", {}).values():
            if prop.get("type") in ("integer", "number", "boolean"):
                scalar = {k: prop.pop(k) for k in list(prop) if k not in ("title", "description", "default")}
                prop["anyOf"] = [scalar, INTERPOLATION]
        for value in node.values():
            _allow_interpolation(value)
    elif isinstance(node, list):
        for value in node:
            _allow_interpolation(value)


def json_schema() -> dict:
    schema = Spec.model_json_schema(mode="validation")
    _allow_interpolation(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "moeplat spec"
    # `extends` is consumed by the loader before validation, so it is not a Spec field.
    schema["properties"] = {
        "extends": {"type": "string", "description": "Relative path of a base spec this file overrides."},
        **schema["properties"],
    }
    return schema
