"""`train.init: {kind: hf}`: start a run from a transformers checkpoint directory.

Without `upcycle`, the spec's model must be the one the checkpoint describes: the model section
that moeplat.interop's family derives from config.json is validated and compared with the spec's,
key by key, ignoring only what does not change the function computed (dropout, init_std,
max_seq_len, the losses' coefficients, the dispatcher, the vocabulary padding rule); then the
weights are copied in. With `upcycle: true` the checkpoint must be dense (Llama, Qwen2): it is read
into the dense moeplat model it describes and upcycled into the spec's MoE model exactly as
`kind: upcycle` does (moeplat.compile.upcycle). Every mismatch is a SpecError on train.init.*.
"""

from __future__ import annotations

import torch

from moeplat.errors import SpecError, SpecIssue
from moeplat.nn import TransformerLM
from moeplat.spec.model import ModelSpec
from moeplat.spec.root import Spec
from moeplat.spec.sections import HfInit

# Model keys that do not change the function the weights compute (training-time settings).
IGNORED = (
    "dropout",
    "init_std",
    "max_seq_len",
    "vocab_multiple",
    "moe.losses",
    "moe.dispatch",
    "moe.router.logits_precision",  # the same function in float32, the precision a run starts in
)


def init_from_hf(spec: Spec, model: TransformerLM) -> bool:
    """Apply `spec.train.init` when it is `kind: hf` to a freshly built `model`; True if it did."""
    init = spec.train.init
    if not isinstance(init, HfInit):
        return False
    from moeplat.compile.model import build_model
    from moeplat.compile.upcycle import upcycle
    from moeplat.interop.hf_model import read_hf_dir

    try:
        family, config, weights = read_hf_dir(init.dir)
        section = ModelSpec.model_validate(family.model_section(config))
    except (ValueError, KeyError, OSError) as e:  # pydantic's ValidationError is a ValueError
        raise SpecError(SpecIssue("train.init.path", f"{init.dir}: {e}")) from None
    if init.upcycle:
        if section.moe is not None:
            raise SpecError(
                SpecIssue(
                    "train.init.upcycle", f"the checkpoint is already MoE ({family.name}): drop upcycle"
                )
            )
        dense = build_model(spec.model_copy(update={"model": section}))
        _copy(family, dense, weights, init.dir)
        upcycle(
            model,
            dense.state_dict(),
            granularity=spec.model.moe.granularity,
            noise=init.noise,
            seed=init.seed,
        )
        return True
    diffs = differences(spec.model, section)
    if diffs:
        raise SpecError(
            SpecIssue(
                "train.init.path",
                f"the checkpoint's model is not the spec's ({family.name}):\n  "
                + "\n  ".join(diffs)
                + "\n`moeplat import DIR -o spec.yaml` writes the matching model section",
            )
        )
    _copy(family, model, weights, init.dir)
    return True


def _copy(family, model: TransformerLM, weights: dict[str, torch.Tensor], where: str) -> None:
    try:
        with torch.no_grad():
            family.from_hf(model, weights)
    except (KeyError, ValueError, RuntimeError) as e:
        raise SpecError(SpecIssue("train.init.path", f"{where}: {e}")) from None


def differences(ours: ModelSpec, theirs: ModelSpec) -> list[str]:
    """`model.KEY: spec has A, checkpoint has B` for every key that changes the function."""
    a, b = _flat(_canonical(ours)), _flat(_canonical(theirs))
    keys = sorted(set(a) | set(b))
    return [
        f"model.{k}: spec has {a.get(k)!r}, checkpoint has {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not any(k == i or k.startswith(i + ".") for i in IGNORED)
    ]


def _canonical(m: ModelSpec) -> dict:
    """The model section with equal models written alike: the MoE layers as indices, the KV heads
    as a number, the shared experts as their fused width (moeplat fuses count x d_ff into one MLP)."""
    d = m.model_dump()
    d["n_kv_heads"] = m.kv_heads
    if m.moe is not None:
        d["moe"]["layers"] = m.moe_layers
        shared = d["moe"].get("shared_experts")
        if shared is not None:
            width = shared.pop("count") * (shared.pop("d_ff") or m.moe.experts.d_ff)
            shared["width"] = width
    return d


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out
