"""What one transformers causal-LM family is to moeplat: `Family`, and `Unsupported`.

A family module (moeplat.interop.hf_model_families, hf_deepseek) defines one Family each and
imports this module, never moeplat.interop.hf_model (which imports the family modules to build
its registry, FAMILIES).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeplat.nn import TransformerLM


class Unsupported(ValueError):
    """What stands between a model (or a checkpoint) and a transformers family, one feature a line.

    Export problems name spec keys and values ("model.moe.router.kind: hash (...)"), import
    problems config.json keys ("clip_qkv: 8.0 (...)").
    """

    def __init__(self, features: list[str], family: str | None = None) -> None:
        self.features, self.family = list(features), family
        head = f"transformers' {family} cannot compute this model:" if family else "unsupported:"
        super().__init__("\n".join([head, *(f"  {f}" for f in self.features)]))


@dataclass(frozen=True)
class Family:
    """One transformers causal-LM family (its config's model_type) and the conversions to and from it.

    problems(model): [] when the family computes exactly `model` (in evaluation), else the features
    in the way, in spec terms. config(model): kwargs for `config_class`. to_hf(model): the state dict
    of `model_class` (transformers' in-memory layout: fused experts). model_section(config_dict):
    the moeplat spec's `model:` section (a plain dict) of a config.json; raises Unsupported for a
    config moeplat cannot compute. from_hf(model, state): copy such a state dict into a model built
    from that section; a ValueError names every missing, unexpected or mis-shaped tensor.
    """

    name: str
    config_class: str
    model_class: str
    problems: Callable[[TransformerLM], list[str]]
    config: Callable[[TransformerLM], dict]
    to_hf: Callable[[TransformerLM], dict[str, torch.Tensor]]
    model_section: Callable[[dict], dict]
    from_hf: Callable[[TransformerLM, dict[str, torch.Tensor]], None]
