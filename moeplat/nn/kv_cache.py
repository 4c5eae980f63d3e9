"""A key/value cache for autoregressive decoding: each attention layer keeps what it computed for
earlier tokens, so a decoding step runs the model on the new tokens only.

    cache = KVCache(model.n_layers, max_len=len(prompt) + max_new_tokens)
    out = model(prompt_BS, cache=cache)          # prefill: positions 0 .. S-1
    out = model(next_B1, cache=out.cache)        # one step: position S, attends to all S + 1

What a layer stores is its own choice (`LayerKV.append` takes named tensors): CausalSelfAttention
keeps k and v after RoPE at n_kv_heads (GQA shares them across query heads); MLA keeps only the
normalised latent c_kv and the shared RoPE key (DeepSeek-V2 sec. 2.1.2, the compressed cache).
Every tensor's sequence axis is dimension -2 ([B, KV, S, hd], [B, S, L], [B, 1, S, r]).

Buffers are allocated on a layer's first append at `max_len` along that axis (one allocation, no
torch.cat per step: appending writes into a slice). The number of cached tokens is the position
offset of the next tokens' RoPE; positions are absolute, so a batch shares one offset (no padding).
"""

from __future__ import annotations

import torch


class LayerKV:
    """One attention layer's cache: named buffers [..., max_len, X], the first `length` filled."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.buffers: dict[str, torch.Tensor] = {}

    def append(self, **new: torch.Tensor) -> list[torch.Tensor]:
        """Write the new tokens' tensors (sequence axis -2, all S long) after the cached ones and
        return each buffer up to the new length, in the order given (views, not copies)."""
        S = next(iter(new.values())).shape[-2]
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {S} new > max_len {self.max_len}")
        out = []
        for name, x in new.items():
            buf = self.buffers.get(name)
            if buf is None:
                shape = (*x.shape[:-2], self.max_len, x.shape[-1])
                buf = self.buffers[name] = torch.empty(shape, dtype=x.dtype, device=x.device)
            buf[..., self.length : end, :] = x
            out.append(buf[..., :end, :])
        self.length = end
        return out


class KVCache:
    """One LayerKV per layer; `length` = tokens cached = the next token's position."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.layers = [LayerKV(max_len) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]


def causal_mask(S: int, total: int, device: torch.device) -> torch.Tensor | None:
    """bool [S, total]: query i (position total - S + i) sees keys at positions <= its own.

    None where no mask is needed: one query sees every cached key. For a square S == total,
    callers use SDPA's is_causal instead; this is for S new tokens after total - S cached ones
    (SDPA's is_causal aligns a non-square mask top-left, which is wrong here)."""
    if S == 1:
        return None
    return torch.ones(S, total, dtype=torch.bool, device=device).tril(diagonal=total - S)
