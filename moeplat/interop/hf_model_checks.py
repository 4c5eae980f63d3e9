"""What keeps a moeplat TransformerLM from being exactly a transformers family, in spec terms.

`model_problems(model, rules)` reads the built modules (not the spec: moeplat.interop does not
import moeplat.spec) and names each feature by the spec key that sets it. The balancing and
z-loss coefficients, the dispatcher and the router's logits precision never block an export: the
first two are training objectives, the last two compute the same function (in float32).
"""

from __future__ import annotations

from moeplat.nn import CausalSelfAttention, DenseFFN, MoELayer, TopKRouter, TransformerLM

ROUTER_KINDS = {  # nn router class -> (spec router kind, why no family here computes it)
    "SwitchRouter": (
        "switch",
        "its input jitter; kind topk with top_k: 1, normalize: false is the same router",
    ),
    "NoisyTopKRouter": ("noisy_topk", "learned noise on the logits"),
    "GShardRouter": ("gshard", "a randomly dropped second expert in training"),
    "HashRouter": ("hash", "no transformers family routes by token id"),
    "RandomRouter": ("random", "no transformers family routes at random"),
    "SigmoidBiasRouter": ("sigmoid_bias", "sigmoid scores with a selection bias: the deepseek_v3 family"),
    "GroupLimitedRouter": ("group_limited", "group-limited choice"),
    "SinkhornRouter": ("sinkhorn", "Sinkhorn-balanced choice in training"),
    "ExpertChoiceRouter": (
        "expert_choice",
        "experts choose tokens; these families route each token to top_k",
    ),
    "ReinforceRouter": ("reinforce", "experts sampled in training"),
    "TopPRouter": ("top_p", "a varying number of experts per token; these families route to top_k"),
}
QK_NORM = {None: "false", "whole": "true", "head": "head"}


def model_problems(model: TransformerLM, rules) -> list[str]:
    problems = _attention_problems(model, rules) + _dropout_problems(model)
    moe = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    dense = [b.ffn for b in model.blocks if isinstance(b.ffn, DenseFFN)]
    problems += _layout_problems(model, rules, len(moe))
    problems += _kind_problems({f.activation for f in dense}, {m.experts.activation for m in moe})
    if len({f.w_up.out_features for f in dense}) > 1:
        problems.append("model.dense_ffn.d_ff differs between layers")
    if moe:
        problems += _moe_problems(moe, rules)
    return problems


def _kind_problems(dense: set[str], experts: set[str]) -> list[str]:
    """The MLP kinds (the shared experts take the routed experts' kind) against one gated hidden_act."""
    problems = [
        f"{key}: {kind} (transformers' families have gated MLPs: swiglu or geglu)"
        for key, kinds in (("model.dense_ffn.kind", dense), ("model.moe.experts.kind", experts))
        for kind in sorted(kinds)
        if kind not in ("swiglu", "geglu")
    ]
    if not problems and len(dense | experts) > 1:
        problems.append(
            f"model.dense_ffn.kind: {', '.join(sorted(dense))} and model.moe.experts.kind: "
            f"{', '.join(sorted(experts))} differ (transformers has one hidden_act for every MLP)"
        )
    return problems


def _attention_problems(model: TransformerLM, rules) -> list[str]:
    attns = [b.attn for b in model.blocks]
    if not all(isinstance(a, CausalSelfAttention) for a in attns):
        return ["model.attention.kind: mla (multi-head latent attention: the deepseek_v3 family only)"]
    a, problems = attns[0], []
    shape = {
        (x.n_heads, x.n_kv_heads, x.head_dim, x.qk_norm, x.wq.bias is not None, x.rope_theta) for x in attns
    }
    if len(shape) > 1:
        problems.append("model.attention differs between layers")
    bias = a.wq.bias is not None
    if rules.qkv_bias is not None and bias != rules.qkv_bias:
        problems.append(
            f"model.attention.qkv_bias: {str(bias).lower()} (this family's q/k/v biases are {'on' if rules.qkv_bias else 'off'})"
        )
    if a.qk_norm != rules.qk_norm:
        problems.append(
            f"model.attention.qk_norm: {QK_NORM[a.qk_norm]} (this family has qk_norm: {QK_NORM[rules.qk_norm]})"
        )
    D = model.tok_emb.embedding_dim
    if D % a.n_heads:
        problems.append(f"model.n_heads: {a.n_heads} (transformers needs d_model {D} divisible by it)")
    elif rules.full_head_dim and a.head_dim != D // a.n_heads:
        problems.append(
            f"model.attention.head_dim: {a.head_dim} (this family's head_dim is d_model / n_heads)"
        )
    return problems


def _dropout_problems(model: TransformerLM) -> list[str]:
    p = model.emb_drop.p
    return [f"model.dropout: {p} (transformers' families have no embedding or residual dropout)"] if p else []


def _layout_problems(model: TransformerLM, rules, n_moe: int) -> list[str]:
    n = model.n_layers
    if rules.moe == "none" and n_moe:
        return [f"model.moe: {n_moe} MoE layers (this family is dense)"]
    if rules.moe == "all" and n_moe < n:
        return [f"model.moe.layers: {n_moe} of {n} layers are MoE (this family makes every layer MoE)"]
    if rules.moe == "any" and not n_moe:
        return ["model.moe: null (this family is MoE)"]
    return []


def _moe_problems(layers: list[MoELayer], rules) -> list[str]:
    problems = []
    for name, values in (
        ("num_experts", [m.num_experts for m in layers]),
        ("top_k", [m.top_k for m in layers]),
        ("experts.d_ff", [m.experts.d_ff for m in layers]),
    ):
        if len(set(values)) > 1:
            problems.append(f"model.moe.{name}: {values} per MoE layer (transformers' families have one)")
    m = layers[0]
    r = m.router
    if type(r) is not TopKRouter:
        kind, why = ROUTER_KINDS.get(type(r).__name__, (type(r).__name__, "not a softmax top-k router"))
        problems.append(f"model.moe.router.kind: {kind} ({why})")
    else:
        if rules.normalize is not None and r.normalize != rules.normalize:
            problems.append(
                f"model.moe.router.normalize: {str(r.normalize).lower()} (this family renormalises the top-k weights)"
            )
        if r.null_experts:
            problems.append(
                f"model.moe.router.null_experts: {r.null_experts} (no transformers family has MoE++ zero experts: 0)"
            )
    for opt, value in (
        ("jitter_eps", getattr(r, "jitter_eps", 0.0)),
        ("dropout", getattr(r, "dropout", 0.0)),
    ):
        if value:
            problems.append(
                f"model.moe.router.{opt}: {value} (no transformers family has router input noise)"
            )
    if getattr(r, "logit_softcap", None) is not None:
        problems.append(
            f"model.moe.router.logit_softcap: {r.logit_softcap} (no transformers family caps router logits)"
        )
    if m.experts.dropout:
        problems.append(
            f"model.moe.experts.dropout: {m.experts.dropout} (no transformers family has expert dropout)"
        )
    if m.capacity_factor_train is not None or m.capacity_factor_eval is not None:
        problems.append(
            "model.moe.capacity.kind: factor (transformers' families are dropless: capacity kind dropless)"
        )
    if m.residual_coef is not None:
        problems.append(
            "model.moe.shared_experts.residual_coefficient: true (no transformers family mixes by learned coefficients)"
        )
    problems += _shared_problems(m, rules)
    return problems


def _shared_problems(m: MoELayer, rules) -> list[str]:
    if not rules.shared_expert:
        if m.shared is not None:
            return [
                "model.moe.shared_experts.count: >= 1 (this family has no shared experts: qwen2_moe has one, gated)"
            ]
        return []
    if m.shared is None:
        return ["model.moe.shared_experts.count: 0 (this family has one shared expert with a sigmoid gate)"]
    if m.shared_gate is None:
        return [
            "model.moe.shared_experts.gate: false (this family gates its shared expert by sigmoid(x w_g))"
        ]
    return []
