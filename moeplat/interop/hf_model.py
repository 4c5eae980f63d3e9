"""Whole models: moeplat's TransformerLM <-> transformers' causal LMs, with the same weights and function.

    family = choose_family(model)               # the first family that computes exactly `model`
    config, hf_model = to_hf_model(model)       # transformers objects holding model's weights
    family, config, weights = read_hf_dir(path) # a save_pretrained directory, in memory layout
    section = family.model_section(config)      # the moeplat spec's `model:` section of it
    family.from_hf(build_model(...), weights)   # (moeplat.compile builds the model)

FAMILIES maps transformers' model_type to a Family (moeplat.interop.hf_family): llama, qwen2,
mixtral, olmoe, qwen2_moe, qwen3_moe (moeplat.interop.hf_model_families) and deepseek_v3
(moeplat.interop.hf_deepseek). What each computes, and what keeps a model from each: those
modules, and docs/interop.md. tests/interop/test_hf_model.py checks transformers' logits equal
moeplat's, both ways, for each family. transformers and safetensors are imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeplat.interop import hf_model_families
from moeplat.interop.hf_family import Family, Unsupported
from moeplat.interop.hf_weights import fuse_experts
from moeplat.nn import TransformerLM

__all__ = ["FAMILIES", "Family", "Unsupported", "choose_family", "hf_logits", "read_hf_dir", "to_hf_model"]


def _families() -> dict[str, Family]:
    families = list(hf_model_families.FAMILIES)
    try:
        from moeplat.interop.hf_deepseek import DEEPSEEK_V3
    except ImportError as e:  # the module, or its Family, not there yet
        if "hf_deepseek" not in str(e) and "DEEPSEEK_V3" not in str(e):
            raise
    else:
        families.append(DEEPSEEK_V3)
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _families()


def choose_family(model: TransformerLM) -> Family:
    """The first family (in FAMILIES' order) that computes exactly `model`; else Unsupported with
    the features in the way of the closest one (the fewest problems)."""
    found = {name: family.problems(model) for name, family in FAMILIES.items()}
    for name, problems in found.items():
        if not problems:
            return FAMILIES[name]
    closest = min(found, key=lambda name: len(found[name]))
    raise Unsupported(found[closest], closest)


def to_hf_model(model: TransformerLM, family: str | None = None):
    """(config, model) of transformers' `family` (default: choose_family) holding a float32 copy of
    `model`'s weights, in evaluation mode. Unsupported when that family does not compute `model`."""
    import transformers

    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    fam = FAMILIES[family] if family is not None else choose_family(model)
    problems = fam.problems(model)
    if problems:
        raise Unsupported(problems, fam.name)
    config = getattr(transformers, fam.config_class)(**fam.config(model))
    hf_model = getattr(transformers, fam.model_class)(config).to(torch.float32)
    weights = {k: v.to(device="cpu", dtype=torch.float32) for k, v in fam.to_hf(model).items()}
    hf_model.load_state_dict(weights, strict=True)
    return config, hf_model.eval()


def read_hf_dir(path) -> tuple[Family, dict, dict[str, torch.Tensor]]:
    """(family, config.json as a dict, weights in transformers' in-memory layout) of a directory
    that save_pretrained wrote: model.safetensors or a sharded model.safetensors.index.json."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; give the directory save_pretrained wrote")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not one moeplat reads; supported: {', '.join(FAMILIES)}"
        )
    files, expected = _weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path}: the index lists tensors its shards lack: {', '.join(missing[:10])}")
    return FAMILIES[model_type], config, fuse_experts(weights)


def _weight_files(path: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files of a checkpoint directory and the tensor names its index promises."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single], []
    if not index.is_file():
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (moeplat reads safetensors only; "
            "save the model with save_pretrained(safe_serialization=True))"
        )
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = [path / name for name in dict.fromkeys(weight_map.values())]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise FileNotFoundError(f"{path}: shards listed in {index.name} are missing: {', '.join(absent)}")
    return shards, list(weight_map)


@torch.no_grad()
def hf_logits(path, idx_BS: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, S, V] that transformers computes for idx_BS from a save_pretrained directory."""
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return hf_model(idx_BS).logits.float()
