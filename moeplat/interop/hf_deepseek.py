"""DeepSeek-V3 whole models: moeplat's TransformerLM <-> transformers' DeepseekV3ForCausalLM.

`DEEPSEEK_V3` is the moeplat.interop.hf_family.Family that moeplat.interop.hf_model registers:
`problems(model)` names every feature of a model that DeepSeek-V3 does not compute, `config(model)`
gives the DeepseekV3Config kwargs, `to_hf(model)` the state dict (moeplat.interop.hf_deepseek_weights);
`model_section(config_dict)` is the spec `model:` section of a config, `from_hf(model, state)`
copies a state dict into the model built from it.

What transformers 5 computes (models/deepseek_v3/modeling_deepseek_v3.py) and the moeplat part
that computes the same (tests/interop/test_hf_deepseek.py: equal logits both ways in float32):

- pre-norm blocks with RMSNorm(rms_norm_eps) before attention and FFN: moeplat's Block.
- attention: MLA (DeepSeek-V2 sec. 2.1; moeplat.nn.mla): q_proj, or q_a_proj / q_a_layernorm /
  q_b_proj with q_lora_rank; kv_a_proj_with_mqa (= wkv_a [L + r, D]), kv_a_layernorm, kv_b_proj,
  o_proj; softmax scale qk_head_dim^-0.5 with the default RoPE (yarn's mscale has no moeplat
  counterpart). The latent RMSNorms keep DeepseekV3RMSNorm's default eps 1e-6 whatever
  rms_norm_eps says, and moeplat has one norm_eps: it must be 1e-6. The RoPE rows are permuted for
  transformers' interleaved layout (rope_interleave=True; hf_deepseek_weights says why).
- the first `first_k_dense_replace` FFNs are gated MLPs of intermediate_size (model.dense_ffn,
  moe.layers first_dense), the others DeepseekV3MoE (hf_families: sigmoid_bias router with
  n_group / topk_group / norm_topk_prob / routed_scaling_factor, e_score_correction_bias = bias_E,
  n_shared_experts shared experts of moe_intermediate_size fused into one MLP).

Not carried: the multi-token-prediction layers (num_nextn_predict_layers: export writes 0, import
skips model.layers.{n_layers..}); the bias step gamma and balancing losses (training objectives;
transformers never moves the bias, an import keeps the spec's default gamma); the 1e-20 DeepSeek-V3
adds to the normalising sum (moeplat.interop.hf). transformers' float64 is not float64 throughout
(its RMSNorm computes in float32), so parity is checked in float32.
"""

from __future__ import annotations

from moeplat.interop.hf_deepseek_weights import hf_state, load_hf_state
from moeplat.interop.hf_family import Family, Unsupported
from moeplat.interop.hf_model_checks import ROUTER_KINDS
from moeplat.interop.hf_model_families import HIDDEN_ACT, KIND
from moeplat.nn import DenseFFN, MoELayer, SigmoidBiasRouter, TransformerLM
from moeplat.nn.mla import MultiHeadLatentAttention

NAME = "deepseek_v3"
LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, which q_a_layernorm and kv_a_layernorm keep


# --- what is in the way -----------------------------------------------------------------------


def problems(model: TransformerLM) -> list[str]:
    """[] when DeepseekV3ForCausalLM computes exactly what `model` computes; else one line per
    feature in the way, in spec terms: `path: value (why: what to set)`. The router's
    logits_precision and the dispatcher never block: they compute the same function in float32."""
    out = _attention_problems(model)
    if model.emb_drop.p:
        out.append(f"model.dropout: {model.emb_drop.p} (DeepSeek-V3 has no embedding or residual dropout: 0)")
    ffns = [block.ffn for block in model.blocks]
    moe_at = [i for i, ffn in enumerate(ffns) if isinstance(ffn, MoELayer)]
    if moe_at != list(range(model.n_layers - len(moe_at), model.n_layers)):
        out.append(
            f"model.moe.layers: MoE layers {moe_at} (DeepSeek-V3 keeps its first k layers dense and"
            " the rest MoE: layers kind first_dense)"
        )
    kinds = {ffn.activation if isinstance(ffn, DenseFFN) else ffn.experts.activation for ffn in ffns}
    if kinds - set(HIDDEN_ACT):
        out.append(
            f"MLP kind {', '.join(sorted(kinds - set(HIDDEN_ACT)))} (DeepSeek-V3's MLPs are gated: swiglu or geglu)"
        )
    elif len(kinds) > 1:
        out.append(
            f"model.dense_ffn.kind and model.moe.experts.kind differ ({', '.join(sorted(kinds))}):"
            " DeepSeek-V3 has one hidden_act for every MLP"
        )
    layers = [ffns[i] for i in moe_at]
    if len({(m.num_experts, m.top_k, m.experts.d_ff) for m in layers}) > 1:
        out.append(
            "model.moe.num_experts, top_k or experts.d_ff differ by MoE layer (DeepSeek-V3 has one of each)"
        )
    for problem in (p for layer in layers for p in _moe_problems(layer)):
        if problem not in out:
            out.append(problem)
    return out


def _attention_problems(model: TransformerLM) -> list[str]:
    attns = [block.attn for block in model.blocks]
    if not all(isinstance(a, MultiHeadLatentAttention) for a in attns):
        return [
            "model.attention.kind: gqa (DeepSeek-V3 uses multi-head latent attention: attention kind mla)"
        ]
    out = []
    if {model.norm.eps, *(a.kv_norm.eps for a in attns)} != {LATENT_NORM_EPS}:
        out.append(
            f"model.norm_eps: {model.norm.eps} (transformers' DeepSeek-V3 normalises the MLA latents with"
            " eps 1e-6 whatever rms_norm_eps is, and moeplat has one norm_eps: norm_eps 1e-6)"
        )
    return out


def _moe_problems(layer: MoELayer) -> list[str]:
    r = layer.router
    if not isinstance(r, SigmoidBiasRouter):
        kind = ROUTER_KINDS.get(type(r).__name__, ("topk",))[0]
        return [
            f"model.moe.router.kind: {kind} (DeepSeek-V3 routes with sigmoid scores and a bias:"
            " router kind sigmoid_bias)"
        ]
    out = [
        f"model.moe.router.{name}: {value} (DeepSeek-V3's router has none: {off})"
        for name, value, off in (
            ("jitter_eps", r.jitter_eps, 0),
            ("dropout", r.dropout, 0),
            ("logit_softcap", r.logit_softcap, "null"),
        )
        if value
    ]
    if layer.experts.dropout:
        out.append(
            f"model.moe.experts.dropout: {layer.experts.dropout} (DeepSeek-V3 has no expert dropout: 0)"
        )
    if layer.capacity_factor_eval is not None or layer.capacity_factor_train is not None:
        out.append("model.moe.capacity.kind: factor (DeepSeek-V3 drops no token: capacity kind dropless)")
    return out + _shared_problems(layer)


def _shared_problems(layer: MoELayer) -> list[str]:
    if layer.shared is None:
        return ["model.moe.shared_experts.count: 0 (DeepSeek-V3 has shared experts: count >= 1)"]
    out, hidden, F = [], layer.shared.w_up.out_features, layer.experts.d_ff
    if hidden % F:
        out.append(
            f"model.moe.shared_experts.d_ff: count x d_ff = {hidden} (DeepSeek-V3's shared MLP is"
            f" n_shared_experts x the routed d_ff {F}: d_ff null)"
        )
    if layer.shared_gate is not None:
        out.append("model.moe.shared_experts.gate: true (DeepSeek-V3's shared experts are ungated: false)")
    if layer.residual_coef is not None:
        out.append("model.moe.shared_experts.residual_coefficient: true (DeepSeek-V3 adds the two: false)")
    return out


def _check(model: TransformerLM) -> None:
    found = problems(model)
    if found:
        raise Unsupported(found, NAME)


# --- export -----------------------------------------------------------------------------------


def config(model: TransformerLM) -> dict:
    """The DeepseekV3Config kwargs of `model` (see problems())."""
    _check(model)
    attn, ffns = model.blocks[0].attn, [block.ffn for block in model.blocks]
    moe = [ffn for ffn in ffns if isinstance(ffn, MoELayer)]
    dense = [ffn for ffn in ffns if isinstance(ffn, DenseFFN)]
    kind = dense[0].activation if dense else moe[0].experts.activation
    cfg = {
        "vocab_size": model.tok_emb.num_embeddings,
        "hidden_size": model.tok_emb.embedding_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_heads,  # MLA: every head its own key and value
        "q_lora_rank": None if attn.wq_a is None else attn.wq_a.out_features,
        "kv_lora_rank": attn.kv_lora_rank,
        "qk_nope_head_dim": attn.nope_dim,
        "qk_rope_head_dim": attn.rope_dim,
        "v_head_dim": attn.v_dim,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope_theta},
        "rope_interleave": True,  # to_hf permutes the RoPE rows (module docstring)
        "attention_bias": False,
        "attention_dropout": 0.0,  # problems() refuses dropout
        "hidden_act": HIDDEN_ACT[kind],
        "initializer_range": model.init_std,
        "tie_word_embeddings": model.tie_embeddings,
        "first_k_dense_replace": len(dense),
        "num_nextn_predict_layers": 0,
        "intermediate_size": dense[0].w_up.out_features if dense else moe[0].experts.d_ff,
    }
    return cfg | (_moe_config(moe[0]) if moe else _no_moe_config(cfg["intermediate_size"]))


def _moe_config(layer: MoELayer) -> dict:
    r, F = layer.router, layer.experts.d_ff
    return {
        "n_routed_experts": layer.num_experts,
        "num_experts_per_tok": layer.top_k,
        "moe_intermediate_size": F,
        "n_shared_experts": layer.shared.w_up.out_features // F,
        "n_group": r.n_groups,
        "topk_group": r.topk_groups,
        "norm_topk_prob": r.normalize,
        "routed_scaling_factor": r.scaling_factor,
    }


def _no_moe_config(d_ff: int) -> dict:
    # first_k_dense_replace = num_hidden_layers builds no MoE layer; these only have to be valid.
    return {
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": d_ff,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
    }


# --- import: the spec ---------------------------------------------------------------------------


def model_section(hf: dict) -> dict:
    """The spec `model:` section (a plain dict) of a DeepSeek-V3 config: a config.json dict or
    DeepseekV3Config.to_dict(); missing keys take transformers' defaults, legacy rope keys its
    conversion. Unsupported names each setting moeplat cannot compute."""
    from transformers import DeepseekV3Config

    c = DeepseekV3Config.from_dict(hf).to_dict()
    in_the_way = _import_problems(c)
    if in_the_way:
        raise Unsupported(in_the_way, NAME)
    n, k = c["num_hidden_layers"], min(c["first_k_dense_replace"] or 0, c["num_hidden_layers"])
    kind = KIND[c["hidden_act"]]
    section = {
        "vocab_size": c["vocab_size"],
        "d_model": c["hidden_size"],
        "n_layers": n,
        "n_heads": c["num_attention_heads"],
        "attention": {
            "kind": "mla",
            "kv_lora_rank": c["kv_lora_rank"],
            "q_lora_rank": c["q_lora_rank"],
            "qk_nope_head_dim": c["qk_nope_head_dim"],
            "qk_rope_head_dim": c["qk_rope_head_dim"],
            "v_head_dim": c["v_head_dim"],
        },
        "max_seq_len": c["max_position_embeddings"],
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "norm_eps": c["rms_norm_eps"],
        "tie_embeddings": c["tie_word_embeddings"],
        "init_std": c["initializer_range"],
    }
    if k:
        section["dense_ffn"] = {"kind": kind, "d_ff": c["intermediate_size"]}
    if k < n:
        section["moe"] = _moe_section(c, k, kind)
    return section


def _moe_section(c: dict, k: int, kind: str) -> dict:
    return {
        "num_experts": c["n_routed_experts"],
        "top_k": c["num_experts_per_tok"],
        "layers": {"kind": "first_dense", "k": k},
        # gamma is left at the spec's default: transformers never moves the bias, training may
        "router": {
            "kind": "sigmoid_bias",
            "n_groups": c["n_group"] or 1,
            "topk_groups": c["topk_group"] or 1,
            "normalize": bool(c["norm_topk_prob"]),
            "scaling_factor": float(c["routed_scaling_factor"]),
        },
        "experts": {"kind": kind, "d_ff": c["moe_intermediate_size"]},
        "shared_experts": {"count": c["n_shared_experts"]},
        "capacity": {"kind": "dropless"},
    }


def _import_problems(c: dict) -> list[str]:
    """Settings of a (normalised) DeepseekV3Config that moeplat's model cannot compute."""
    # num_key_value_heads is not read: MLA's keys and values have every head already (transformers'
    # SDPA and flash paths ignore it; its default, 128, stands in configs that never set it).
    out, rope = [], c["rope_parameters"] or {}
    if rope.get("rope_type", "default") != "default":
        out.append(f"rope_parameters.rope_type: {rope['rope_type']} (moeplat's RoPE has no scaling: default)")
    if not c["rope_interleave"]:
        out.append("rope_interleave: false (from_hf reads the interleaved RoPE rows, transformers' default)")
    if c["attention_bias"]:
        out.append("attention_bias: true (moeplat's MLA has no biases)")
    if c["hidden_act"] not in HIDDEN_ACT.values():
        out.append(f"hidden_act: {c['hidden_act']} (moeplat's gated MLPs: silu or gelu)")
    if c["rms_norm_eps"] != LATENT_NORM_EPS:
        out.append(
            f"rms_norm_eps: {c['rms_norm_eps']} (the latent norms' eps is 1e-6 and moeplat has one eps)"
        )
    if c["n_shared_experts"] < 1 and (c["first_k_dense_replace"] or 0) < c["num_hidden_layers"]:
        out.append("n_shared_experts: 0 (moeplat's DeepSeek-V3 export and import need shared experts)")
    if c.get("quantization_config"):
        method = c["quantization_config"].get("quant_method", "?")
        out.append(f"quantization_config: {method} (moeplat loads unquantised weights: dequantise first)")
    return out


def to_hf(model: TransformerLM) -> dict:
    """The DeepseekV3ForCausalLM state dict of `model`, in its dtype and device."""
    _check(model)
    return hf_state(model)


def from_hf(model: TransformerLM, state: dict) -> None:
    """Copy a DeepseekV3ForCausalLM state dict into `model`, built from model_section(config)."""
    _check(model)
    load_hf_state(model, state)


DEEPSEEK_V3 = Family(
    name=NAME,
    config_class="DeepseekV3Config",
    model_class="DeepseekV3ForCausalLM",
    problems=problems,
    config=config,
    to_hf=to_hf,
    model_section=model_section,
    from_hf=from_hf,
)
