"""A moeplat TransformerLM's tensors under transformers' names and layouts (Llama-style decoders).

`model_slots(model)` lists one Slot per transformers tensor: its key, its shape and how to read it
from / write it into the moeplat module, so that export (`state_dict`) and import (`load`) are one
table. Layouts (transformers 5 in memory):

- nn.Linear weights are [out, in] on both sides: copied as they are.
- routed experts: transformers fuses them as gate_up_proj [E, 2F, D] (gate rows first) and
  down_proj [E, D, F]; moeplat stores w_gate, w_up [E, D, F] and w_down [E, F, D] (x @ W).
- checkpoints on disk keep one tensor per expert (save_pretrained writes the hub layout:
  Mixtral's block_sparse_moe.experts.{e}.w1/w2/w3, the others' mlp.experts.{e}.gate/up/down_proj);
  `fuse_experts` turns those into the in-memory layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeplat.nn import DenseFFN, MLPExperts, MoELayer, TransformerLM


@dataclass(frozen=True)
class Slot:
    key: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]  # the transformers tensor, from the moeplat module
    write: Callable[[torch.Tensor], None]  # copy a transformers tensor into the moeplat module


def param(key: str, p: torch.Tensor) -> Slot:
    return Slot(key, tuple(p.shape), lambda: p.detach().clone(), lambda t: p.copy_(t))


def attention_slots(prefix: str, attn: nn.Module) -> list[Slot]:
    """CausalSelfAttention as q/k/v/o_proj (+ biases) and q_norm / k_norm."""
    slots = []
    for hf, ours in (("q_proj", attn.wq), ("k_proj", attn.wk), ("v_proj", attn.wv), ("o_proj", attn.wo)):
        slots.append(param(f"{prefix}.{hf}.weight", ours.weight))
        if ours.bias is not None:
            slots.append(param(f"{prefix}.{hf}.bias", ours.bias))
    if attn.q_norm is not None:
        slots += [param(f"{prefix}.q_norm.weight", attn.q_norm.weight)]
        slots += [param(f"{prefix}.k_norm.weight", attn.k_norm.weight)]
    return slots


def mlp_slots(prefix: str, ffn: DenseFFN) -> list[Slot]:
    """A gated MLP as gate_proj / up_proj / down_proj."""
    return [
        param(f"{prefix}.gate_proj.weight", ffn.w_gate.weight),
        param(f"{prefix}.up_proj.weight", ffn.w_up.weight),
        param(f"{prefix}.down_proj.weight", ffn.w_down.weight),
    ]


def expert_slots(prefix: str, ex: MLPExperts) -> list[Slot]:
    E, D, F = ex.num_experts, ex.d_model, ex.d_ff

    def read_gate_up() -> torch.Tensor:
        return torch.cat([ex.w_gate.transpose(1, 2), ex.w_up.transpose(1, 2)], dim=1).detach().clone()

    def write_gate_up(t: torch.Tensor) -> None:
        ex.w_gate.copy_(t[:, :F].transpose(1, 2))
        ex.w_up.copy_(t[:, F:].transpose(1, 2))

    return [
        Slot(f"{prefix}.gate_up_proj", (E, 2 * F, D), read_gate_up, write_gate_up),
        Slot(
            f"{prefix}.down_proj",
            (E, D, F),
            lambda: ex.w_down.transpose(1, 2).detach().clone(),
            lambda t: ex.w_down.copy_(t.transpose(1, 2)),
        ),
    ]


def ffn_slots(prefix: str, ffn: nn.Module, shared: str = "shared_expert") -> list[Slot]:
    """A dense MLP, or an MoE layer: gate (the router), experts, the shared expert(s) under
    `shared` (Qwen2-MoE's name) and Qwen2-MoE's shared_expert_gate."""
    if isinstance(ffn, DenseFFN):
        return mlp_slots(prefix, ffn)
    assert isinstance(ffn, MoELayer), type(ffn)
    slots = [
        param(f"{prefix}.gate.weight", ffn.router.weight),
        *expert_slots(f"{prefix}.experts", ffn.experts),
    ]
    if ffn.shared is not None:
        slots += mlp_slots(f"{prefix}.{shared}", ffn.shared)
    if ffn.shared_gate is not None:
        slots.append(param(f"{prefix}.shared_expert_gate.weight", ffn.shared_gate.weight))
    return slots


def model_slots(model: TransformerLM, ffn: Callable = ffn_slots, attention: Callable = attention_slots):
    """Every tensor of a Llama-style causal LM (`model.` body, `lm_head`); a tied head has none."""
    slots = [param("model.embed_tokens.weight", model.tok_emb.weight)]
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        slots.append(param(f"{p}.input_layernorm.weight", block.attn_norm.weight))
        slots += attention(f"{p}.self_attn", block.attn)
        slots.append(param(f"{p}.post_attention_layernorm.weight", block.ffn_norm.weight))
        slots += ffn(f"{p}.mlp", block.ffn)
    slots.append(param("model.norm.weight", model.norm.weight))
    if not model.tie_embeddings:
        slots.append(param("lm_head.weight", model.lm_head.weight))
    return slots


def state_dict(model: TransformerLM, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """The transformers state dict; a tied lm_head is listed too, as transformers' own state_dict does."""
    out = {s.key: s.read() for s in slots}
    if model.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


@torch.no_grad()
def load(model: TransformerLM, slots: list[Slot], weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the slots; one ValueError lists every missing, mis-shaped or unexpected tensor."""
    expected = {s.key: s for s in slots}
    ignored = {"lm_head.weight"} if model.tie_embeddings else set()  # tied: the embedding is the head
    problems = [f"missing tensor {k} {s.shape}" for k, s in expected.items() if k not in weights]
    problems += [
        f"{k}: the checkpoint's shape is {tuple(weights[k].shape)}, the model's {s.shape}"
        for k, s in expected.items()
        if k in weights and tuple(weights[k].shape) != s.shape
    ]
    problems += [f"unexpected tensor {k}" for k in weights if k not in expected and k not in ignored]
    if problems:
        raise ValueError("the weights do not fit the model:\n  " + "\n  ".join(problems))
    for s in slots:
        s.write(weights[s.key])


_EXPERT = re.compile(
    r"^(?P<pre>.+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
    r"(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def fuse_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's per-expert tensors in transformers' in-memory layout (see the module doc);
    Mixtral's `block_sparse_moe.` becomes `mlp.`. Already fused tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in weights.items():
        m = _EXPERT.match(key)
        if m is None:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = t
        else:
            experts.setdefault(m["pre"], {}).setdefault(int(m["e"]), {})[_PART[m["name"]]] = t
    for pre, by_id in experts.items():
        ids = sorted(by_id)
        incomplete = [e for e in ids if set(by_id[e]) != {"gate", "up", "down"}]
        if ids != list(range(len(ids))) or incomplete:
            raise ValueError(
                f"{pre}.mlp.experts: the checkpoint has experts {ids}, incomplete {incomplete}: "
                "every expert 0..E-1 needs its gate, up and down weights"
            )
        gate_up = [torch.cat([by_id[e]["gate"], by_id[e]["up"]], dim=0) for e in ids]
        out[f"{pre}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{pre}.mlp.experts.down_proj"] = torch.stack([by_id[e]["down"] for e in ids])
    return out
