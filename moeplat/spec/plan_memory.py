"""Activation memory of one training micro-batch, from the spec alone (no torch): the tensors autograd
keeps for backward, as moeplat/nn builds the model, and the attention kernel that actually runs.

Bytes per token and layer; tests/spec/test_plan_memory.py checks the sum against the bytes the built
model saves for backward (torch.autograd.graph.saved_tensors_hooks) for every spec in specs/, and
`moeplat bench --memory` (moeplat.bench.memory) the whole estimate against a measured step peak.

What is kept, per block (pre-norm, moeplat.nn.model.Block):
- each RMSNorm: its input and the normalised input (D each) and 1/rms (1), float32 even under
  bf16-mixed (the residual stream stays float32); its output (D) is saved by the matmuls reading it;
- attention, fused kernel (flash, memory-efficient, cuDNN, the CPU flash kernel): q, k, v as the
  kernel sees them (GQA's k and v repeated to every query head), the output and one logsumexp per
  head and row. No S x S matrix: the kernel recomputes the scores in backward (FlashAttention,
  Dao et al. 2022, sec. 3.1). Math kernel: q and k scaled copies, v, softmax(QK^T) (S per head and
  token; with dropout also its mask and the dropped copy) and the output's copy for W_O.
  MLA adds its latents: the normed and raw q latent (q_lora_rank), the kv latent and RoPE key
  (kv_lora_rank + rope), the normed kv latent twice (norm and W_UKV input);
- MoE FFN (sorted or loop dispatch): the gathered token copies (K x D), the experts' hidden
  activations (GLU: gate, up, act(gate), product = 4 x K x F; gelu: 2; relu: 1), the combine
  (expert output and weighted output, 2 x K x D; sorted with F <= D weights the hidden instead:
  K x F + K x D); with a capacity factor below 1, only that share of the K slots. Routers that
  leave slots unused (top-p, MoE++ null experts) count all K: how many a token takes depends on
  the router's state (near 6 of top-p's 8 at initialisation, about 3 once trained, issue 17), so
  the plan is their upper bound, the memory a step can come to;
  int64 indices, the router's scores and probabilities (2 x E, float32); capacity dispatch: the
  [E, C, D] buffer, hidden activations over E x C rows and the gathered outputs; shared experts as a
  dense MLP of their width;
- dense FFN: the hidden activations as above;
- dropout masks where model.dropout > 0 (embedding, attention output, FFN output) and expert
  dropout's on the hidden: bool on CUDA, the input's dtype on the CPU (moeplat.spec.plan_memory.mask_bytes).
The head: the final norm, the logits (compute dtype), their float32 log-softmax, and at the start of
backward the two float32 [tokens, vocab] gradients (of the log-probabilities and the logits), which
coexist with every stored activation: the step's peak.

Which attention kernel runs (torch.nn.functional.scaled_dot_product_attention, is_causal, no mask):
on a GPU a fused one (flash needs equal q/k and v head dims; memory-efficient and cuDNN take MLA's
unequal ones, dropout included); on the CPU the flash kernel, except with attention dropout in
training or unequal head dims (MLA with qk_nope + qk_rope != v_head_dim), where the math kernel
runs. parallel.accelerator `auto` is planned as a GPU: that is where a model worth planning trains.
"""

from __future__ import annotations

from moeplat.spec.attention import MLA, gqa_head_dim
from moeplat.spec.moe import CapacityFactor, resolve_dispatch
from moeplat.spec.root import Spec

F32, I64 = 4, 8


def compute_bytes(spec: Spec) -> int:
    """Bytes of one activation value in the compute dtype (bf16/fp16 under mixed precision)."""
    return 4 if spec.train.precision == "32-true" else 2


def attention_kernel(spec: Spec) -> str:
    """'fused' (no S x S scores kept) or 'math' (softmax(QK^T) kept for backward); see the module doc."""
    m = spec.model
    if spec.parallel.accelerator != "cpu":
        return "fused"
    a = m.attention
    equal_dims = not isinstance(a, MLA) or a.qk_nope_head_dim + a.qk_rope_head_dim == a.v_head_dim
    return "fused" if equal_dims and m.dropout == 0 else "math"


def _norm(d: int) -> int:
    """An RMSNorm's saved input, normalised input and 1/rms, float32 (its output: the reader's)."""
    return 2 * d * F32 + F32


def mask_bytes(spec: Spec, act: int) -> int:
    """Bytes per element of a dropout mask: CUDA's fused kernel keeps a bool mask; the CPU's
    dropout multiplies by a scaled noise tensor of the input's dtype, and keeps that."""
    return act if spec.parallel.accelerator == "cpu" else 1


def _dropout(spec: Spec, n: int, act: int) -> int:
    """A dropout of n values in training: its mask (the dropped values are the reader's)."""
    return n * mask_bytes(spec, act) if spec.model.dropout > 0 else 0


def attention_bytes(spec: Spec, act: int) -> int:
    """Bytes per token kept by one block's attention half: norm, projections' input, kernel."""
    m, kernel = spec.model, attention_kernel(spec)
    a, d, h, s = m.attention, m.d_model, m.n_heads, spec.data.seq_len
    if isinstance(a, MLA):
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        q_lat = 3 * a.q_lora_rank * act + F32 if a.q_lora_rank else 0  # norm in, normed, W_UQ input
        latents = q_lat + (a.kv_lora_rank + a.qk_rope_head_dim) * act + 2 * a.kv_lora_rank * act + F32
    else:
        qk = v = gqa_head_dim(a, d, h)
        latents = 0
        if a.qk_norm:  # RMSNorm on the projected q [H*hd] and k [KV*hd]: input, normed, and a
            # float32 rstd per row: one per token (whole projection) or per head ("head")
            rows = h + m.kv_heads if a.qk_norm == "head" else 2
            latents = 2 * (h + m.kv_heads) * qk * act + rows * F32
    qkv = h * (2 * qk + v) * act  # as the kernel reads them (k, v repeated to every query head)
    if kernel == "fused":
        kept = qkv + h * v * act + h * F32  # output (W_O reads it in place), logsumexp
    else:
        probs = h * s * act + (h * s * (act + mask_bytes(spec, act)) if m.dropout > 0 else 0)
        kept = qkv + probs + h * v * act  # W_O's input: the output transposed into a copy
    return _norm(d) + d * act + latents + kept + _dropout(spec, d, act)


def mlp_hidden_bytes(kind: str, f: int, act: int, dropout_mask: int = 0) -> int:
    """Bytes one MLP row of hidden width f keeps: GLU gate, up, act(gate), product; gelu its input
    and output; relu its output only (its backward reads the output). dropout_mask: bytes per
    element of expert dropout's mask (0: none); the dropped copy then stands in for the product
    (the down projection's input), except after relu, whose own output stays."""
    values = {"relu": 1, "gelu": 2}.get(kind, 4)
    dropped = f * (dropout_mask + (act if kind == "relu" else 0)) if dropout_mask else 0
    return values * f * act + dropped


def ffn_bytes(spec: Spec, moe_j: int | None, act: int) -> int:
    """Bytes per token kept by one block's FFN half (moe_j: its index among the MoE layers)."""
    m, d = spec.model, spec.model.d_model
    base = _norm(d) + d * act + _dropout(spec, d, act)  # norm, its output (the matmuls' input)
    if moe_j is None:
        return base + mlp_hidden_bytes(m.dense_ffn.kind, m.dense_ffn.d_ff, act)
    moe = m.moe
    shape = moe.shape(moe_j)
    E, K, f = shape.routed_experts, shape.routed_top_k, moe.routed_d_ff
    expert_mask = mask_bytes(spec, act) if moe.experts.dropout > 0 else 0
    router = 2 * E * F32 + 4 * K * F32  # scores and probabilities; top-k indices and weights
    cf = moe.capacity.train if isinstance(moe.capacity, CapacityFactor) else None
    dispatch = resolve_dispatch(moe, spec.train.compile)
    if dispatch == "capacity":
        rows = cf * K  # E x C buffer rows per token, C = cf T K / E
        routed = rows * (d * act + mlp_hidden_bytes(moe.experts.kind, f, act, expert_mask))
        routed += K * d * F32 + 2 * K * I64  # the gathered outputs weighted in float32; rows
    else:
        # dropless: K slots per token; with a capacity, at most E x C of them (fewer when drops)
        n = K * min(cf, 1.0) if cf else K
        routed = n * (d * act + mlp_hidden_bytes(moe.experts.kind, f, act, expert_mask))
        # sorted applies the combine weight to the hidden when F <= D (moeplat.nn.dispatch)
        hidden_weighted = dispatch == "sorted" and f <= d
        combine = f * act + d * F32 if hidden_weighted else 2 * d * F32
        routed += n * combine + 2 * K * I64
    se = moe.shared_experts
    shared = 0
    if se.count:
        shared = mlp_hidden_bytes(moe.experts.kind, se.count * (se.d_ff or moe.experts.d_ff), act)
        shared += d * act + 2 * F32 if se.gate else 0  # shared output and sigmoid gate
        shared += 2 * d * act + 4 * F32 if se.residual_coefficient else 0
    return base + router + routed + shared


def head_bytes(spec: Spec, act: int) -> int:
    """Bytes per token of the final norm, the LM head and the loss at the start of backward."""
    m = spec.model
    embedding_dropout = _dropout(spec, m.d_model, act)
    return _norm(m.d_model) + m.d_model * act + m.vocab_size * (act + 3 * F32) + embedding_dropout


def activation_bytes(spec: Spec) -> tuple[list[int], int]:
    """(bytes kept by each block, bytes of the head) for one micro-batch of train.batch_size x seq_len."""
    m, act = spec.model, compute_bytes(spec)
    tokens = spec.train.batch_size * spec.data.seq_len
    moe_pos = {layer: j for j, layer in enumerate(m.moe_layers)}
    attn = attention_bytes(spec, act)
    blocks = [tokens * (attn + ffn_bytes(spec, moe_pos.get(i), act)) for i in range(m.n_layers)]
    return blocks, tokens * head_bytes(spec, act)
