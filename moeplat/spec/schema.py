"""JSON Schema of spec files, for editors (YAML language server) and the web UI."""

from __future__ import annotations

from moeplat.spec.root import Spec


def json_schema() -> dict:
    schema = Spec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "moeplat spec"
    # `extends` is consumed by the loader before validation, so it is not a Spec field.
    schema["properties"] = {
        "extends": {"type": "string", "description": "Relative path of a base spec this file overrides."},
        **schema["properties"],
    }
    return schema
