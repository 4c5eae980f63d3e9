"""Decoder-only transformer LM whose FFNs are dense or MoE layers (pre-norm, RoPE, RMSNorm, SwiGLU or other MLP FFNs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeplat.nn.attention import CausalSelfAttention
from moeplat.nn.balance import StepLoad
from moeplat.nn.experts import DenseFFN, MLPExperts
from moeplat.nn.kv_cache import KVCache, LayerKV
from moeplat.nn.mla import MultiHeadLatentAttention
from moeplat.nn.moe import MoELayer, MoEOutput, StepLoadArg
from moeplat.nn.profiling import ATTENTION, phase
from moeplat.nn.routers import Router


@dataclass(frozen=True)
class LMOutput:
    logits_BSV: torch.Tensor
    loss: torch.Tensor | None  # float32 mean next-token cross-entropy; None without targets
    aux_loss: torch.Tensor  # float32 sum of the MoE layers' weighted aux losses (0 if none)
    moe: dict[int, MoEOutput] = field(default_factory=dict)  # layer index -> that layer's output
    cache: KVCache | None = None  # the KV cache passed to forward, now holding these tokens too


class Block(nn.Module):
    """Pre-norm residual block (GPT-2 / Llama): x + attn(norm(x)), then + ffn(norm(.)).

    Attention applies its own output dropout, so only the FFN branch is dropped here.
    """

    def __init__(self, attn: nn.Module, ffn: nn.Module, d_model: int, norm_eps: float, dropout: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x_BSD: torch.Tensor,
        token_ids_BS: torch.Tensor | None = None,
        step_load: StepLoadArg = None,
        cache: LayerKV | None = None,
        stats: bool = True,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        """token_ids_BS (optional) is passed on to an MoE FFN, whose router may route by token id;
        step_load (optional) too, for its global-batch balancing loss, and `stats` (whether it
        computes its routing statistics; MoELayer.forward); `cache` (decoding) to the attention,
        which then sees the cached tokens too."""
        a_BSD = self.attn_norm(x_BSD)
        with phase(ATTENTION):  # a named range for moeplat bench's per-phase breakdown
            a_BSD = self.attn(a_BSD) if cache is None else self.attn(a_BSD, cache=cache)
        h_BSD = x_BSD + a_BSD
        # an MoELayer, or one sharded by moeplat.parallel (ExpertParallelMoE, same signature)
        if isinstance(self.ffn, MoELayer) and cache is not None:  # decoding: no telemetry to keep
            out = self.ffn(self.ffn_norm(h_BSD), token_ids=token_ids_BS, telemetry=False)
        elif isinstance(self.ffn, MoELayer) or getattr(self.ffn, "shards_moe_layer", False):
            out = self.ffn(self.ffn_norm(h_BSD), token_ids=token_ids_BS, step_load=step_load, stats=stats)
        else:
            out = self.ffn(self.ffn_norm(h_BSD))
        moe = out if isinstance(out, MoEOutput) else None
        return h_BSD + self.drop(moe.y if moe is not None else out), moe


class TransformerLM(nn.Module):
    """Token embedding -> len(ffns) blocks -> RMSNorm -> LM head (tied to the embedding by default).

    `ffns[i]` is the i-th block's FFN (DenseFFN or MoELayer), built by the caller. `attns[i]`, if
    given, is its attention (e.g. MultiHeadLatentAttention); by default each block gets a
    CausalSelfAttention(d_model, n_heads, n_kv_heads).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        max_seq_len: int,
        ffns: list[nn.Module],
        *,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
        attns: list[nn.Module] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        """`activation_checkpointing`: in training, each block's activations are recomputed in
        backward instead of stored (Chen et al. 2016, "Training deep nets with sublinear memory
        cost"); the same numbers (RNG state is replayed), less memory, about one more forward."""
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if not ffns:
            raise ValueError("ffns must hold at least one FFN (one per layer)")
        if attns is not None and len(attns) != len(ffns):
            raise ValueError(f"attns must hold one attention per layer: {len(attns)} != {len(ffns)}")
        attns = attns or [
            CausalSelfAttention(d_model, n_heads, n_kv_heads, rope_theta, dropout, max_seq_len) for _ in ffns
        ]
        self.n_layers, self.init_std, self.tie_embeddings = len(ffns), init_std, tie_embeddings
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(attn, ffn, d_model, norm_eps, dropout) for attn, ffn in zip(attns, ffns, strict=True)
        )
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, counted once by .parameters()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; residual output projections N(0, init_std / sqrt(2 * n_layers)).

        The scaled residual init is GPT-2's (Radford et al. 2019, sec. 2.3): each block adds two
        branches (attention's wo, the FFN's w_down) to the residual stream. Every expert's weights
        are an independent draw (normal_ on the stacked [E, ...] tensor). RMSNorm weights are 1.
        """
        std, resid_std = self.init_std, self.init_std / math.sqrt(2 * self.n_layers)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Router):
                m.init_weights(std)  # N(0, std) for learned scores; each router documents the rest
            elif isinstance(m, MLPExperts):
                if m.w_gate is not None:
                    nn.init.normal_(m.w_gate, 0.0, std)
                nn.init.normal_(m.w_up, 0.0, std)
                nn.init.normal_(m.w_down, 0.0, resid_std)
        for m in self.modules():  # second pass: residual projections of dense FFNs and attention
            if isinstance(m, CausalSelfAttention | MultiHeadLatentAttention):
                nn.init.normal_(m.wo.weight, 0.0, resid_std)
            elif isinstance(m, DenseFFN):
                nn.init.normal_(m.w_down.weight, 0.0, resid_std)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); exclude_embedding drops the V*D token table.

        With tied embeddings the table is also the LM head, so excluding it removes the head too.
        """
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        step_load: StepLoad | None = None,
        *,
        cache: KVCache | None = None,
        stats: bool = True,
    ) -> LMOutput:
        """`step_load`: the optimizer step's expert frequencies per MoE layer, for layers with
        balance_loss_scope "global_batch" (moeplat.nn.balance); None = this batch is the step.

        `stats` False: the MoE layers skip their routing statistics (MoEOutput.stats None; the
        losses, routed_E and load_E are there): training asks for them only on the steps that log
        them (moeplat.train.system). A plain argument rather than module state, so a checkpointed
        block recomputes with what its forward had, and a compiled model sees it as a guarded constant.

        `cache` (decoding, moeplat.nn.kv_cache): idx_BS are the tokens after the cache.length
        cached ones, at absolute positions cache.length ..; each attention appends theirs, and the
        output's `cache` is the same object. MoE layers see the new tokens only: a dropless
        token-choice layer routes them as it would in the whole sequence; a capacity factor (the
        capacity is counted over the tokens of one forward) or expert-choice routing (experts pick
        among the forward's tokens) may route a lone token otherwise."""
        x_BSD = self.emb_drop(self.tok_emb(idx_BS))
        moe: dict[int, MoEOutput] = {}
        for i, block in enumerate(self.blocks):
            layer_load = None if step_load is None else step_load.layer(i)
            kw = {"token_ids_BS": idx_BS, "step_load": layer_load, "stats": stats}
            if cache is not None:
                kw["cache"] = cache[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x_BSD, moe_out = checkpoint(block, x_BSD, use_reentrant=False, **kw)
            else:
                x_BSD, moe_out = block(x_BSD, **kw)
            if moe_out is not None:
                moe[i] = moe_out
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            # float32 cross-entropy: the log-softmax over V is where bf16 round-off hurts most.
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
            if any(out.policy_logprob_T is not None for out in moe.values()):
                moe = self._reward_policies(moe, logits_BSV, targets_BS)
        aux_loss = torch.zeros((), dtype=torch.float32, device=idx_BS.device)
        for out in moe.values():
            aux_loss = aux_loss + out.aux_loss
        return LMOutput(logits_BSV, loss, aux_loss, moe, cache)

    def _reward_policies(
        self, moe: dict[int, MoEOutput], logits_BSV: torch.Tensor, targets_BS: torch.Tensor
    ) -> dict[int, MoEOutput]:
        """Policy routers (ReinforceRouter) get each token's own cross-entropy as negative reward."""
        with torch.no_grad():
            token_loss_T = F.cross_entropy(
                logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none"
            )
        return {i: self.blocks[i].ffn.add_policy_loss(out, token_loss_T) for i, out in moe.items()}

    @torch.no_grad()
    def after_optimizer_step(self, load_by_layer: dict[int, torch.Tensor]) -> None:
        """The explicit after-step hook: call it once after every optimizer step with, per MoE layer
        index, that layer's routed load over the step (sum of MoEOutput.load_E of its micro-batches).
        Routers with online state update it here (the aux-loss-free bias); nothing else changes.
        Lightning training calls it from LMSystem.optimizer_step."""
        for i, load_E in load_by_layer.items():
            self.blocks[i].ffn.after_optimizer_step(load_E)
