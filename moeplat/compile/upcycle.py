"""`train.init: {kind: upcycle}`: sparse upcycling of a dense checkpoint into an MoE model.

Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
sec. 3.1: every weight of the dense model is copied, each MoE layer's experts start as copies of
the dense FFN of that layer, and the router is new. Here:

- embedding, attention, norms, head and the FFNs of dense target layers: copied, same key, same shape;
- MoE layer i: expert e = slice (e mod m) of layer i's dense FFN, m = model.moe.granularity (with
  m = 1 every expert is the whole FFN). Slice j is hidden units [j F/m, (j+1) F/m): the rows of
  w_gate/w_up and the columns of w_down, so the m slices of one copy sum to the dense FFN
  (the "virtual group" sharding of He et al. 2024, "Upcycling Large Language Models into MoE",
  without their weight scaling);
- optional multiplicative noise: each expert tensor W_e <- W_e * (1 + noise * eps), eps ~ N(0, 1)
  elementwise and independent per expert, from a torch.Generator seeded by `seed`;
- routers, shared experts and their gates keep the fresh initialisation of build_model.

With granularity 1, noise 0, no shared experts, dropless capacity and top-k weights that sum to 1
(router topk/group_limited/sinkhorn with normalize: true, sigmoid_bias; any router with top_k 1 and
weight 1), every expert computes the dense FFN and the layer output is sum_k w_k FFN(x) = FFN(x):
the upcycled model computes the dense model's function at step 0.

The source is a Lightning checkpoint written by `moeplat run` (its `state_dict`, keys prefixed
`model.`), a run directory (its checkpoints/last.ckpt), a directory of runs (the newest), or a
plain TransformerLM state_dict file.
Every mismatch is a SpecError on `train.init.checkpoint` naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moeplat.compile.checkpoints import no_checkpoint_message
from moeplat.errors import SpecError, SpecIssue
from moeplat.nn import MoELayer, TransformerLM
from moeplat.spec.root import Spec
from moeplat.spec.sections import UpcycleInit

FIELD = "train.init.checkpoint"
_LAYER = re.compile(r"^blocks\.(\d+)\.ffn\.")


def _error(message: str) -> SpecError:
    return SpecError(SpecIssue(FIELD, message))


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint file `path` names: a file; a run directory (its checkpoints/last.ckpt); or a
    spec's directory of runs such as runs/quickstart-dense (the newest run in it with a last.ckpt).
    Relative paths are relative to the working directory (where `moeplat run` writes runs/)."""
    p = Path(path).expanduser()
    if p.is_dir():
        runs = sorted(p.glob("*/checkpoints/last.ckpt"))  # run directories are named by start time
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt", *runs[-1:]):
            if candidate.is_file():
                return candidate
        newest = [p, *sorted(p.glob("*/run.json"))[-1:]]  # this run, or the newest of a directory of runs
        for kept_none in (no_checkpoint_message(d if d == p else d.parent, "last.ckpt") for d in newest):
            if kept_none:
                raise _error(kept_none)
        raise _error(
            f"{path} is a directory without checkpoints/last.ckpt: neither a moeplat run directory "
            "nor a directory of runs"
        )
    if not p.is_file():
        raise _error(
            f"no such file: {path} (resolved against {Path.cwd()}); run the dense spec first "
            "or --set train.init.checkpoint=PATH"
        )
    return p


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights in `path` (see resolve_checkpoint), keys as in TransformerLM.state_dict()."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the model weights, as load_state_dict gives them; the whole object read from the file:
    a Lightning checkpoint's global_step and the rest), the file read once."""
    file = resolve_checkpoint(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding arbitrary objects
        raise _error(f"{file} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    weights = obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning: LMSystem.model.*
        weights = {
            k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")
        }
    if (
        not isinstance(weights, dict)
        or not weights
        or not all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise _error(f"{file} holds neither a moeplat checkpoint nor a state_dict of tensors")
    return weights, obj


def upcycle_from_spec(spec: Spec, model: TransformerLM) -> bool:
    """Apply `spec.train.init` to a freshly built `model`; True if it upcycled."""
    init = spec.train.init
    if not isinstance(init, UpcycleInit):
        return False
    moe = spec.model.moe
    if moe is None:
        raise SpecError(SpecIssue("train.init", "upcycling builds an MoE model, but model.moe is null"))
    upcycle(
        model, load_state_dict(init.checkpoint), granularity=moe.granularity, noise=init.noise, seed=init.seed
    )
    return True


@torch.no_grad()
def upcycle(
    model: TransformerLM,
    source: dict[str, torch.Tensor],
    *,
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
) -> None:
    """Copy the dense `source` state_dict into `model` (in place), experts from the dense FFNs."""
    target = model.state_dict()
    moe_layers = {i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoELayer)}
    problems: list[str] = []
    used: set[str] = set()
    for key, t in target.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) in moe_layers:
            continue  # filled from the dense FFN below, or kept fresh (router, shared experts)
        if key not in source:
            problems.append(f"the checkpoint has no {key!r}")
        elif source[key].shape != t.shape:
            problems.append(f"{key!r} is {tuple(source[key].shape)} in the checkpoint, {tuple(t.shape)} here")
        else:
            used.add(key)
    tied = {"tok_emb.weight", "lm_head.weight"}
    if model.tie_embeddings and tied <= used and not torch.equal(*(source[k] for k in sorted(tied))):
        problems.append("the checkpoint's LM head is not tied to its embedding (model.tie_embeddings)")
    experts, dense_ffn_keys = {}, set()
    for i in sorted(moe_layers):
        try:
            experts[i] = _layer_experts(model.blocks[i].ffn, source, f"blocks.{i}.ffn.", granularity)
            dense_ffn_keys |= {f"blocks.{i}.ffn.{w}.weight" for w in experts[i]}
        except ValueError as e:
            problems.append(str(e))
    unused = sorted(k for k in source if k not in used | dense_ffn_keys)
    if unused and not problems:
        problems.append(f"the checkpoint has keys this model lacks (another n_layers?): {unused[:4]}")
    if problems:
        raise SpecError([SpecIssue(FIELD, p) for p in problems])
    for key in sorted(used):
        target[key].copy_(source[key])
    gen = torch.Generator().manual_seed(seed)
    for i, weights in experts.items():
        layer_experts = model.blocks[i].ffn.experts
        for name, w in weights.items():
            param = getattr(layer_experts, name)
            if noise:
                w = w * (1 + noise * torch.randn(w.shape, generator=gen, dtype=torch.float32))
            param.copy_(w)


def _layer_experts(layer: MoELayer, source: dict, prefix: str, m: int) -> dict[str, torch.Tensor]:
    """The stacked expert tensors ([E, D, f] / [E, f, D], input-major) made from the dense FFN at `prefix`."""
    if any(k.startswith(prefix + "experts.") for k in source):
        raise ValueError(f"{prefix[:-1]!r} is an MoE layer in the checkpoint: upcycling needs a dense one")
    ex = layer.experts
    E, D, f = ex.num_experts, ex.d_model, ex.d_ff
    gated = ex.w_gate is not None
    names = ("w_gate", "w_up", "w_down") if gated else ("w_up", "w_down")
    missing = [f"{prefix}{n}.weight" for n in names if f"{prefix}{n}.weight" not in source]
    if missing:
        raise ValueError(f"the checkpoint has no {missing[0]!r} (a dense FFN of model.moe.experts.kind)")
    if not gated and f"{prefix}w_gate.weight" in source:
        raise ValueError(
            f"{prefix}w_gate.weight: the checkpoint's FFN is gated, model.moe.experts.kind is not"
        )
    F = m * f
    want = {"w_gate": (F, D), "w_up": (F, D), "w_down": (D, F)}
    for n in names:
        got = tuple(source[f"{prefix}{n}.weight"].shape)
        if got != want[n]:
            raise ValueError(
                f"{prefix}{n}.weight is {got} in the checkpoint, need {want[n]}: the dense d_ff must "
                f"equal model.moe.experts.d_ff ({F}) and d_model {D}"
            )
    assert E % m == 0, (E, m)  # routed experts = num_experts * granularity
    shard = torch.arange(E) % m  # expert e holds hidden units [j f, (j+1) f), j = e mod m
    out = {}
    for n in names:
        w = source[f"{prefix}{n}.weight"].float()
        if n == "w_down":  # [D, F] -> slices [f, D]
            slices = w.t().reshape(m, f, D)
        else:  # nn.Linear [F, D] -> slices [f, D] -> input-major [D, f]
            slices = w.reshape(m, f, D).transpose(1, 2)
        out[n] = slices[shard].clone()
    return out
