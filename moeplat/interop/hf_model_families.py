"""Llama, Qwen2, Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE as moeplat.interop.hf_family.Family.

What each computes (transformers 5, models/<family>/modeling_<family>.py), all pre-norm decoders
with RMSNorm(rms_norm_eps) in float32, rotate-half RoPE (rope_parameters.rope_theta, type
"default"), SDPA causal attention with scale head_dim^-0.5, gated MLPs act(x W_gate) * x W_up with
act = ACT2FN[hidden_act] (silu: moeplat swiglu; gelu, the exact erf GELU: geglu):

- llama: no biases (attention_bias would add an o_proj bias, which moeplat lacks); dense only.
- qwen2: q/k/v biases always, no o bias; dense only.
- mixtral: every layer MoE; router logits x W^T in the activations' dtype, softmax in float32,
  top-k renormalised; no shared experts; no attention biases.
- olmoe: as Mixtral with `norm_topk_prob`; q_norm / k_norm over the whole projections (so
  head_dim must be hidden_size / heads); attention_bias would bias o_proj too.
- qwen2_moe: `norm_topk_prob`; one shared expert scaled by sigmoid(x w_g); `qkv_bias`; dense
  layers where `mlp_only_layers` or (i + 1) % decoder_sparse_step says so (intermediate_size).
- qwen3_moe: as Qwen2-MoE without the shared expert and biases; q_norm / k_norm per head.

moeplat differs from all of them only in round-off: RoPE tables from float64 angles (transformers:
float32), the router's logits in float32 unless `logits_precision: input` (imports set it).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplat.interop.hf_family import Family, Unsupported
from moeplat.interop.hf_model_checks import model_problems
from moeplat.interop.hf_weights import load, model_slots, state_dict
from moeplat.nn import DenseFFN, MoELayer, TransformerLM

HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu"}  # gated MLP kind -> transformers' hidden_act
KIND = {act: kind for kind, act in HIDDEN_ACT.items()}


@dataclass(frozen=True)
class Rules:
    """What a family can express (moeplat.interop.hf_model_checks reads it)."""

    moe: str  # "none": dense only; "all": every layer MoE; "any": any set of MoE layers
    qkv_bias: bool | None  # the value it needs; None: either
    qk_norm: str | None  # None, "whole" or "head"
    normalize: bool | None = None  # the router's renormalisation it needs; None: either
    shared_expert: bool = False  # one shared expert with a sigmoid gate (Qwen2-MoE)
    full_head_dim: bool = False  # head_dim must be hidden_size / heads (OLMoE's norms assume it)


# --- export --------------------------------------------------------------------------------


def _ffns(model: TransformerLM) -> tuple[list[MoELayer], list[DenseFFN]]:
    ffns = [b.ffn for b in model.blocks]
    return [f for f in ffns if isinstance(f, MoELayer)], [f for f in ffns if isinstance(f, DenseFFN)]


def base_config(model: TransformerLM) -> dict:
    """Config kwargs every family here shares."""
    attn, (moe, dense) = model.blocks[0].attn, _ffns(model)
    act = (dense or [m.experts for m in moe])[0].activation
    return {
        "vocab_size": model.tok_emb.num_embeddings,
        "hidden_size": model.tok_emb.embedding_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "hidden_act": HIDDEN_ACT[act],
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm.eps,
        "tie_word_embeddings": model.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(attn.rope_theta)},
        "attention_dropout": 0.0,
        "intermediate_size": dense[0].w_up.out_features if dense else moe[0].experts.d_ff,
    }


def moe_config(model: TransformerLM, experts_key: str) -> dict:
    """Router and experts of a family whose MoE layers are all alike (problems() checked it).
    router_aux_loss_coef: transformers' balancing loss is top_k times moeplat's (hf_families._balance)."""
    layer = _ffns(model)[0][0]
    out = {
        experts_key: layer.num_experts,
        "num_experts_per_tok": layer.top_k,
        "router_aux_loss_coef": layer.balance_coef / layer.top_k,
        "norm_topk_prob": layer.router.normalize,
    }
    return out


def _mixtral(model: TransformerLM) -> dict:
    out = {**base_config(model), **moe_config(model, "num_local_experts"), "router_jitter_noise": 0.0}
    out["sliding_window"] = None  # Mixtral's attention is windowed whenever this is set
    del out["norm_topk_prob"]  # always renormalised
    return out


def _olmoe(model: TransformerLM) -> dict:
    return {
        **base_config(model),
        **moe_config(model, "num_experts"),
        "attention_bias": False,
        "clip_qkv": None,
    }


def _qwen_moe(model: TransformerLM) -> dict:
    moe, _ = _ffns(model)
    dense_layers = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, DenseFFN)]
    out = {**base_config(model), **moe_config(model, "num_experts")}
    out.update(moe_intermediate_size=moe[0].experts.d_ff, mlp_only_layers=dense_layers, decoder_sparse_step=1)
    return out | {"use_sliding_window": False}


def _qwen2_moe(model: TransformerLM) -> dict:
    layer = _ffns(model)[0][0]
    shared = layer.shared.w_up.out_features
    return _qwen_moe(model) | {"shared_expert_intermediate_size": shared, "qkv_bias": _qkv_bias(model)}


def _qkv_bias(model: TransformerLM) -> bool:
    return model.blocks[0].attn.wq.bias is not None


def _dense(extra: dict):
    return lambda model: {**base_config(model), **extra}


# --- import --------------------------------------------------------------------------------


def _section(c: dict, *, qkv_bias: bool, qk_norm: str | None) -> dict:
    """The model section's attention and sizes from a config.json dict."""
    problems = []
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type: {rope['rope_type']} (moeplat has the default RoPE only)")
    if c.get("hidden_act") not in KIND:
        problems.append(f"hidden_act: {c.get('hidden_act')} (moeplat's gated MLPs take silu or gelu)")
    if c.get("use_sliding_window") or ("sliding_attention" in (c.get("layer_types") or [])):
        problems.append("use_sliding_window: true (moeplat attends to the whole causal context)")
    elif c.get("model_type") == "mixtral" and c.get("sliding_window") is not None:  # Mixtral has no switch
        problems.append(
            f"sliding_window: {c['sliding_window']} (moeplat attends to the whole causal context)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            problems.append(f"{key}: true (moeplat has no o_proj / MLP biases)")
    if c.get("clip_qkv") is not None:
        problems.append(f"clip_qkv: {c['clip_qkv']} (moeplat does not clip q, k, v)")
    if problems:
        raise Unsupported(problems, c.get("model_type"))
    D, H = c["hidden_size"], c["num_attention_heads"]
    attention: dict = {
        "kind": "gqa",
        "qkv_bias": qkv_bias,
        "qk_norm": {None: False, "whole": True}.get(qk_norm, qk_norm),
    }
    head_dim = c.get("head_dim") or D // H
    if head_dim != D // H or D % H:
        attention["head_dim"] = head_dim
    return {
        "vocab_size": c["vocab_size"],
        "d_model": D,
        "n_layers": c["num_hidden_layers"],
        "n_heads": H,
        "n_kv_heads": kv if (kv := c.get("num_key_value_heads") or H) != H else None,  # null: = n_heads
        "attention": attention,
        "max_seq_len": c["max_position_embeddings"],
        "rope_theta": float(rope["rope_theta"]),
        "norm_eps": float(c["rms_norm_eps"]),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
    }


def layer_selection(moe_layers: list[int], n_layers: int) -> dict:
    """The spec's `moe.layers` for these MoE layer indices, in the plainest form that says it."""
    if moe_layers == list(range(n_layers)):
        return {"kind": "all"}
    first = moe_layers[0]
    if moe_layers == list(range(first, n_layers)):
        return {"kind": "first_dense", "k": first}
    step = moe_layers[1] - first if len(moe_layers) > 1 else 0
    if step > 1 and moe_layers == list(range(first, n_layers, step)) and n_layers - moe_layers[-1] <= step:
        return {"kind": "every", "n": step, "offset": first}
    return {"kind": "list", "layers": moe_layers}


def _moe_section(c: dict, *, experts: int, d_ff: int, normalize: bool, moe_layers: list[int]) -> dict:
    K, n = c["num_experts_per_tok"], c["num_hidden_layers"]
    moe: dict = {
        "num_experts": experts,
        "top_k": K,
        "layers": layer_selection(moe_layers, n),
        # transformers computes the router's logits in the activations' dtype
        "router": {"kind": "topk", "normalize": normalize, "logits_precision": "input"},
        "experts": {"kind": KIND[c["hidden_act"]], "d_ff": d_ff},
    }
    coef = c.get("router_aux_loss_coef") or 0.0
    if coef > 0:
        moe["losses"] = {"load_balancing": {"coef": coef * K}}  # hf_families._balance
    return moe


def _dense_section(qkv_bias: bool):
    def section(c: dict) -> dict:
        out = _section(c, qkv_bias=qkv_bias, qk_norm=None)
        return out | {"dense_ffn": {"kind": KIND[c["hidden_act"]], "d_ff": c["intermediate_size"]}}

    return section


def _mixtral_section(c: dict) -> dict:
    out = _section(c, qkv_bias=False, qk_norm=None)
    layers = list(range(c["num_hidden_layers"]))
    moe = _moe_section(
        c, experts=c["num_local_experts"], d_ff=c["intermediate_size"], normalize=True, moe_layers=layers
    )
    return out | {"moe": moe}


def _olmoe_section(c: dict) -> dict:
    out = _section(c, qkv_bias=False, qk_norm="whole")
    layers = list(range(c["num_hidden_layers"]))
    normalize = bool(c.get("norm_topk_prob", False))
    return out | {
        "moe": _moe_section(
            c, experts=c["num_experts"], d_ff=c["intermediate_size"], normalize=normalize, moe_layers=layers
        )
    }


def _qwen_moe_section(c: dict, *, qkv_bias: bool, qk_norm: str | None, shared: bool) -> dict:
    out = _section(c, qkv_bias=qkv_bias, qk_norm=qk_norm)
    n, step, only = (
        c["num_hidden_layers"],
        c.get("decoder_sparse_step") or 1,
        set(c.get("mlp_only_layers") or []),
    )
    experts = c.get("num_experts") or c.get("num_local_experts")
    moe_layers = [i for i in range(n) if i not in only and experts > 0 and (i + 1) % step == 0]
    kind = KIND[c["hidden_act"]]
    if len(moe_layers) < n:
        out["dense_ffn"] = {"kind": kind, "d_ff": c["intermediate_size"]}
    if not moe_layers:
        return out
    normalize = bool(c.get("norm_topk_prob", False))
    moe = _moe_section(
        c, experts=experts, d_ff=c["moe_intermediate_size"], normalize=normalize, moe_layers=moe_layers
    )
    if shared:
        moe["shared_experts"] = {"count": 1, "d_ff": c["shared_expert_intermediate_size"], "gate": True}
    return out | {"moe": moe}


# --- the families ---------------------------------------------------------------------------


def complete(config: dict, config_class: str) -> dict:
    """A config.json dict with transformers' defaults filled in (a config.json may leave them out)
    and older keys in today's form (rope_theta -> rope_parameters), as transformers reads it."""
    import transformers

    return getattr(transformers, config_class).from_dict(config).to_dict()


def _family(name: str, cls: str, rules: Rules, config, section) -> Family:
    return Family(
        name=name,
        config_class=f"{cls}Config",
        model_class=f"{cls}ForCausalLM",
        problems=lambda model: model_problems(model, rules),
        config=config,
        to_hf=lambda model: state_dict(model, model_slots(model)),
        model_section=lambda c: section(complete(c, f"{cls}Config")),
        from_hf=lambda model, weights: load(model, model_slots(model), weights),
    )


LLAMA = _family(
    "llama",
    "Llama",
    Rules(moe="none", qkv_bias=False, qk_norm=None),
    _dense({"attention_bias": False, "mlp_bias": False}),
    _dense_section(qkv_bias=False),
)
QWEN2 = _family(
    "qwen2",
    "Qwen2",
    Rules(moe="none", qkv_bias=True, qk_norm=None),
    _dense({"use_sliding_window": False}),
    _dense_section(qkv_bias=True),
)
MIXTRAL = _family(
    "mixtral",
    "Mixtral",
    Rules(moe="all", qkv_bias=False, qk_norm=None, normalize=True),
    _mixtral,
    _mixtral_section,
)
OLMOE = _family(
    "olmoe",
    "Olmoe",
    Rules(moe="all", qkv_bias=False, qk_norm="whole", full_head_dim=True),
    _olmoe,
    _olmoe_section,
)
QWEN2_MOE = _family(
    "qwen2_moe",
    "Qwen2Moe",
    Rules(moe="any", qkv_bias=None, qk_norm=None, shared_expert=True),
    _qwen2_moe,
    lambda c: _qwen_moe_section(c, qkv_bias=bool(c.get("qkv_bias", True)), qk_norm=None, shared=True),
)
QWEN3_MOE = _family(
    "qwen3_moe",
    "Qwen3Moe",
    Rules(moe="any", qkv_bias=False, qk_norm="head"),
    lambda model: _qwen_moe(model) | {"attention_bias": False},
    lambda c: _qwen_moe_section(c, qkv_bias=False, qk_norm="head", shared=False),
)
FAMILIES = (LLAMA, QWEN2, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE)
