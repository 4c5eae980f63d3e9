"""DeepSeek-V3's weight map: every tensor of a moeplat MLA / MoE TransformerLM under
transformers' DeepseekV3ForCausalLM names and in its in-memory layout (fused routed experts).

`_pairs` lists (key, transformers view, moeplat view) of equal shape and layout, so that one table
copies in either direction (moeplat.interop.hf._copy). The MoE layers' pairs come from
moeplat.interop.hf_families.weight_pairs, on a stand-in for DeepseekV3MoE holding the tensors.

RoPE layout. transformers' `rope_interleave` (its default, the layout of DeepSeek's released
weights) rotates the pairs (x_2i, x_2i+1) of the RoPE part by frequency i (apply_rotary_pos_emb_
interleave) and returns [rotated evens; rotated odds]; moeplat's MLA rotates (x_i, x_i+r/2)
(rotate-half, RoFormer eq. 34 in Llama's layout). Both rotate the same pairs by the same angles
when the RoPE rows of the query projection (per head) and of kv_a_proj_with_mqa are permuted:
transformers row 2i = moeplat row i, row 2i+1 = moeplat row i + r/2. Queries and keys get the
same permutation, so q.k, hence the attention, is unchanged. Export therefore writes
rope_interleave=True with permuted rows, and import reads that layout; export, import of
released checkpoints and the round trip share it.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from moeplat.interop.hf import _copy
from moeplat.interop.hf_families import weight_pairs
from moeplat.nn import MoELayer, TransformerLM
from moeplat.nn.mla import MultiHeadLatentAttention

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def hf_state(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The DeepseekV3ForCausalLM state dict of `model` (its dtype and device); a tied
    lm_head.weight is the embedding tensor itself, as in transformers' own state_dict."""
    tensors = _Tensors(None)
    _copy(_pairs(model, tensors), to_moeplat=False)
    state = tensors.state
    if model.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def load_hf_state(model: TransformerLM, state: dict[str, torch.Tensor]) -> None:
    """Copy a DeepseekV3ForCausalLM state dict into `model`; one ValueError names every missing,
    mis-shaped or unexpected tensor (nothing is copied then). Skipped: the multi-token-prediction
    layers (model.layers.{n_layers..}, num_nextn_predict_layers) and a tied lm_head.weight."""
    tensors = _Tensors(state)
    pairs = _pairs(model, tensors)
    problems = tensors.problems + [
        f"unexpected tensor {key}"
        for key in state
        if key not in tensors.used
        and not (key == "lm_head.weight" and model.tie_embeddings)
        and not ((m := _LAYER.match(key)) and int(m.group(1)) >= model.n_layers)
    ]
    if problems:
        raise ValueError("the weights do not fit the model:\n  " + "\n  ".join(problems))
    _copy(pairs, to_moeplat=True)


class _Tensors:
    """transformers-layout tensors by key: for export each is allocated like the moeplat tensor it
    receives; for import each is looked up, and a missing or mis-shaped one is noted in `problems`
    (a stand-in of the right shape takes its place, so that every problem is found at once)."""

    def __init__(self, state: dict[str, torch.Tensor] | None) -> None:
        self.export, self.state = state is None, state if state is not None else {}
        self.used: set[str] = set()
        self.problems: list[str] = []

    def __call__(self, key: str, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(like.shape) if shape is None else shape
        if self.export:
            self.state[key] = like.detach().new_empty(shape)
            return self.state[key]
        self.used.add(key)
        if key not in self.state:
            self.problems.append(f"missing tensor {key} {shape}")
        elif tuple(self.state[key].shape) != shape:
            got = tuple(self.state[key].shape)
            self.problems.append(f"{key}: the checkpoint's shape is {got}, the model's {shape}")
        else:
            return self.state[key]
        return like.detach().new_empty(shape)


# --- the weight map -----------------------------------------------------------------------------


def _pairs(model: TransformerLM, get: _Tensors) -> Pairs:
    """(key, transformers view, moeplat view) for every tensor; views of equal shape and layout."""
    pairs = [_same("model.embed_tokens.weight", model.tok_emb.weight, get)]
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        pairs.append(_same(p + "input_layernorm.weight", block.attn_norm.weight, get))
        pairs.append(_same(p + "post_attention_layernorm.weight", block.ffn_norm.weight, get))
        pairs += _attention(p + "self_attn.", block.attn, get)
        ffn = block.ffn
        pairs += _moe(p + "mlp.", ffn, get) if isinstance(ffn, MoELayer) else _mlp(p + "mlp.", ffn, get)
    pairs.append(_same("model.norm.weight", model.norm.weight, get))
    if not model.tie_embeddings:
        pairs.append(_same("lm_head.weight", model.lm_head.weight, get))
    return pairs


def _same(key: str, ours: torch.Tensor, get: _Tensors) -> tuple[str, torch.Tensor, torch.Tensor]:
    return key, get(key, ours), ours


def _mlp(p: str, mlp: nn.Module, get: _Tensors) -> Pairs:
    names = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
    return [_same(f"{p}{hf}.weight", getattr(mlp, ours).weight, get) for hf, ours in names]


def _attention(p: str, attn: MultiHeadLatentAttention, get: _Tensors) -> Pairs:
    if attn.wq is not None:
        pairs = _query(p + "q_proj.weight", attn.wq.weight, attn, get)
    else:
        pairs = [
            _same(p + "q_a_proj.weight", attn.wq_a.weight, get),
            _same(p + "q_a_layernorm.weight", attn.q_norm.weight, get),
            *_query(p + "q_b_proj.weight", attn.wq_b.weight, attn, get),
        ]
    key, L, ours = p + "kv_a_proj_with_mqa.weight", attn.kv_lora_rank, attn.wkv_a.weight
    hf = get(key, ours)
    pairs += [
        (f"{key}[:{L}]", hf[:L], ours[:L]),
        (f"{key}[{L}:] (RoPE rows)", _interleaved(hf[L:], 0), _rotate_half(ours[L:], 0)),
        _same(p + "kv_a_layernorm.weight", attn.kv_norm.weight, get),
        _same(p + "kv_b_proj.weight", attn.wkv_b.weight, get),
        _same(p + "o_proj.weight", attn.wo.weight, get),
    ]
    return pairs


def _query(key: str, ours: torch.Tensor, attn: MultiHeadLatentAttention, get: _Tensors) -> Pairs:
    """Each head's n rows without RoPE as they are, its r RoPE rows permuted (module docstring)."""
    n, r = attn.nope_dim, attn.rope_dim
    hf_HdX, ours_HdX = (t.view(attn.n_heads, n + r, -1) for t in (get(key, ours), ours))
    return [
        (f"{key} (per head, rows without RoPE)", hf_HdX[:, :n], ours_HdX[:, :n]),
        (f"{key} (per head, RoPE rows)", _interleaved(hf_HdX[:, n:], 1), _rotate_half(ours_HdX[:, n:], 1)),
    ]


def _interleaved(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """RoPE rows laid out (x_0, x_1), (x_2, x_3), ...: [.., r/2 pairs, 2, ..]."""
    return rows.unflatten(dim, (rows.shape[dim] // 2, 2))


def _rotate_half(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """RoPE rows laid out (x_0 .. x_{r/2-1}), (x_{r/2} ..): the same [.., r/2 pairs, 2, ..] view."""
    return rows.unflatten(dim, (2, rows.shape[dim] // 2)).transpose(dim, dim + 1)


def _moe(p: str, layer: MoELayer, get: _Tensors) -> Pairs:
    """The DeepseekV3MoE keys, mapped by hf_families.weight_pairs on a stand-in for the block."""
    E, D, F = layer.num_experts, layer.experts.d_model, layer.experts.d_ff
    ns, w = SimpleNamespace, layer.experts.w_up
    shared = {
        hf: ns(weight=get(f"{p}shared_experts.{hf}.weight", getattr(layer.shared, ours).weight))
        for hf, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
    }
    block = ns(
        gate=ns(
            weight=get(p + "gate.weight", layer.router.weight),
            e_score_correction_bias=get(p + "gate.e_score_correction_bias", layer.router.bias_E),
        ),
        experts=ns(
            gate_up_proj=get(p + "experts.gate_up_proj", w, (E, 2 * F, D)),
            down_proj=get(p + "experts.down_proj", w, (E, D, F)),
        ),
        shared_experts=ns(**shared),
    )
    return [(p + name, hf, ours) for name, hf, ours in weight_pairs("deepseek_v3", block, layer)]
