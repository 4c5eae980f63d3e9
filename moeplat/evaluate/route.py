"""Routing analysis on text: which experts each MoE layer chose for every token, and with what weight.

    table = route_text(model, tok, text)       # RouteTable: per layer, per token (expert, weight)
    table.to_json()                            # what `moeplat route --json` prints and --log stores
    render_html(table)                         # moeplat.evaluate.route_html: the coloured view

The text is cut into windows of model.max_seq_len tokens, each run alone (batch 1, no grad, eval
mode), so every token is routed exactly once with at most max_seq_len tokens of left context.
Expert-choice routers choose tokens per expert over a window, so a token gets 0..E experts there;
capacity factors in eval mode may drop slots: a dropped slot is listed under `dropped`, not among the
experts that computed the token.

Per layer and expert the table also holds the load (share of routed slots) and the tokens routed to
it most often, by count and by lift, count_e(tok) / n_e over count(tok) / N: how much more often
the token goes to this expert than its overall frequency says, so that spaces and common letters do
not top every expert (Lepikhin et al. 2020 and Jiang et al. 2024, sec. 5, read routing this way).
"""

from __future__ import annotations

import codecs
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from moeplat.nn.moe import MoELayer
from moeplat.nn.routers import RouterOutput

TOP_TOKENS = 10  # rows of each expert's top-token tables
MIN_LIFT_COUNT = 2  # a token routed once to a rare expert would top the lift table by chance
FORMAT_VERSION = 1


class NoMoELayers(ValueError):
    """The model has no MoE layer (a dense model): there is no routing to show."""


@dataclass(frozen=True)
class TopToken:
    id: int
    token: str  # label of the id (hex <c3> for a byte that is part of a character)
    count: int  # times the token was routed to this expert
    lift: float  # (count / tokens of this expert) / (occurrences / all tokens)


@dataclass(frozen=True)
class LayerRoute:
    """One MoE layer's decision for every token of the text (T tokens, E experts)."""

    layer: int  # block index in the model
    router: str  # router class name
    num_experts: int
    experts: list[list[int]]  # [T][0..E] experts that computed the token, heaviest first
    weights: list[list[float]]  # [T][same] their combine weights
    dropped: list[list[int]]  # [T][...] experts routed to but dropped by the capacity factor
    load: list[float]  # [E] share of the routed slots (dropped ones included); sums to 1
    top_count: list[list[TopToken]]  # [E] most frequent tokens routed to the expert
    top_lift: list[list[TopToken]]  # [E] tokens by lift (at least MIN_LIFT_COUNT times)

    def top1(self) -> list[int]:
        """Per token its heaviest expert, -1 where no expert computed it."""
        return [e[0] if e else -1 for e in self.experts]


@dataclass(frozen=True)
class RouteTable:
    ids: list[int]  # [T] token ids
    pieces: list[str]  # [T] text of the characters that end in each token ("" mid-character)
    labels: dict[int, str]  # id -> how the id alone reads
    layers: list[LayerRoute]
    window: int  # tokens per forward pass (model.max_seq_len)
    truncated: bool  # the text had more tokens than max_tokens
    source: str = ""  # what was routed (the run, the text file)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "source": self.source,
            "meta": self.meta,
            "window": self.window,
            "truncated": self.truncated,
            "ids": self.ids,
            "pieces": self.pieces,
            "labels": {str(i): s for i, s in sorted(self.labels.items())},
            "layers": [_layer_json(lr) for lr in self.layers],
        }


def _layer_json(lr: LayerRoute) -> dict:
    def tops(rows: list[list[TopToken]]) -> list[list[dict]]:
        return [[{"id": t.id, "token": t.token, "count": t.count, "lift": t.lift} for t in r] for r in rows]

    return {
        "layer": lr.layer,
        "router": lr.router,
        "num_experts": lr.num_experts,
        "experts": lr.experts,
        "weights": lr.weights,
        "dropped": lr.dropped,
        "load": lr.load,
        "top_count": tops(lr.top_count),
        "top_lift": tops(lr.top_lift),
    }


def moe_layers(model: torch.nn.Module) -> dict[int, MoELayer]:
    """Block index -> its MoELayer; {} for a dense model."""
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}


@torch.no_grad()
def route_text(model, tok, text: str, *, max_tokens: int | None = None, source: str = "") -> RouteTable:
    """Route `text` through `model` (a TransformerLM) window by window; see the module docstring."""
    layers = moe_layers(model)
    if not layers:
        raise NoMoELayers("the model has no MoE layer (every FFN is dense): there is no routing to show")
    ids = [int(i) for i in np.asarray(tok.encode_texts([text])[0]).reshape(-1)]
    truncated = max_tokens is not None and len(ids) > max_tokens
    ids = ids[:max_tokens] if truncated else ids
    window = int(model.max_seq_len)
    slots: dict[int, list[tuple]] = {i: [] for i in layers}
    hooks = [layer.router.register_forward_hook(_capture(layer, slots[i])) for i, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(ids), window):
            idx_BS = torch.tensor([ids[start : start + window]], dtype=torch.long, device=device)
            model(idx_BS)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    labels = token_labels(tok, ids)
    table_layers = [
        _layer_route(i, layer, [s for part in slots[i] for s in part], ids, labels)
        for i, layer in layers.items()
    ]
    return RouteTable(ids, token_pieces(tok, ids), labels, table_layers, window, truncated, source)


def _capture(layer: MoELayer, out: list):
    """A forward hook on the layer's router: keep each window's decision as per-token slot lists,
    with the capacity mask the layer applies to it (MoELayer.keep_mask, same mode, same T)."""

    def hook(_router, _args, route: RouterOutput) -> None:
        idx_TK, weight_TK = route.topk_idx_TK, route.topk_weight_TK
        valid_TK = torch.ones_like(idx_TK, dtype=torch.bool) if route.valid_TK is None else route.valid_TK
        keep_TK = layer.keep_mask(idx_TK, route.valid_TK, weight_TK)
        out.append(
            list(
                zip(
                    idx_TK.cpu().tolist(),
                    weight_TK.float().cpu().tolist(),
                    valid_TK.cpu().tolist(),
                    keep_TK.cpu().tolist(),
                    strict=True,
                )
            )
        )

    return hook


def _layer_route(i: int, layer: MoELayer, slots: list[tuple], ids: list[int], labels) -> LayerRoute:
    E = layer.num_experts
    assert len(slots) == len(ids), f"layer {i}: routed {len(slots)} of {len(ids)} tokens"
    experts, weights, dropped = [], [], []
    routed_E = np.zeros(E)
    for idx_K, w_K, valid_K, keep_K in slots:
        kept = sorted(
            ((e, w) for e, w, v, k in zip(idx_K, w_K, valid_K, keep_K, strict=True) if v and k),
            key=lambda ew: -ew[1],
        )
        experts.append([e for e, _ in kept])
        weights.append([w for _, w in kept])
        dropped.append([e for e, v, k in zip(idx_K, valid_K, keep_K, strict=True) if v and not k])
        for e, v in zip(idx_K, valid_K, strict=True):
            routed_E[e] += v
    load = (routed_E / max(routed_E.sum(), 1)).tolist()
    top_count, top_lift = top_tokens(ids, experts, E, labels)
    name = type(layer.router).__name__
    return LayerRoute(i, name, E, experts, weights, dropped, load, top_count, top_lift)


def top_tokens(
    ids: list[int], experts: list[list[int]], num_experts: int, labels: dict[int, str], k: int = TOP_TOKENS
) -> tuple[list[list[TopToken]], list[list[TopToken]]]:
    """Per expert: the k tokens routed to it most often, and the k with the highest lift (among
    tokens routed to it at least MIN_LIFT_COUNT times). A token counts once per expert it went to."""
    total, n = Counter(ids), len(ids)
    per_expert = [Counter() for _ in range(num_experts)]
    for tid, chosen in zip(ids, experts, strict=True):
        for e in set(chosen):
            per_expert[e][tid] += 1
    by_count, by_lift = [], []
    for counts in per_expert:
        n_e = sum(counts.values())
        rows = [TopToken(tid, labels[tid], c, (c / n_e) / (total[tid] / n)) for tid, c in counts.items()]
        by_count.append(sorted(rows, key=lambda t: (-t.count, -t.lift, t.id))[:k])
        lifted = [t for t in rows if t.count >= MIN_LIFT_COUNT]
        by_lift.append(sorted(lifted, key=lambda t: (-t.lift, -t.count, t.id))[:k])
    return by_count, by_lift


def validation_text(spec, base_dir: str, max_bytes: int) -> str:
    """The start of the spec's validation documents (of each source, in turn), about `max_bytes`
    of them: text the run never trained on, split as the run split it."""
    from moeplat.compile.data import split_sources

    parts, size = [], 0
    for _, _, _, val in split_sources(spec.data, base_dir):
        for doc in val:
            if size >= max_bytes:
                break
            parts.append(doc.data[: max_bytes - size].decode("utf-8", errors="replace"))
            size += len(doc.data[: max_bytes - size]) + 2
    return "\n\n".join(parts)


# --- token text -----------------------------------------------------------------------------------


def bytes_of(tok):
    """A function id -> the bytes the id stands for: the byte itself for the byte tokenizer, the
    GPT-2 byte-level alphabet mapped back for byte-level BPE, else the id decoded alone."""
    if getattr(tok, "kind", None) == "byte":
        return lambda tid: bytes([tid])
    inner = getattr(tok, "tok", None)  # HFTok's tokenizers.Tokenizer
    added = inner.get_added_tokens_decoder() if inner is not None else {}
    table = _unicode_to_byte()

    def of(tid: int) -> bytes:
        piece = inner.id_to_token(tid) if inner is not None and tid not in added else None
        if piece is not None and set(piece) <= table.keys():
            return bytes(table[c] for c in piece)
        return tok.decode([tid]).encode("utf-8")

    return of


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (Radford et al. 2019; tokenizers' ByteLevel)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_pieces(tok, ids: list[int]) -> list[str]:
    """Per token the characters that end in it, so "".join(pieces) is the text: a multi-byte
    character split over byte tokens is shown once, on its last token; the others get ""."""
    decoder, of = codecs.getincrementaldecoder("utf-8")(errors="replace"), bytes_of(tok)
    pieces = [decoder.decode(of(t)) for t in ids]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


def token_labels(tok, ids) -> dict[int, str]:
    """How each id reads on its own: its text, or its bytes as <hex> when they are not whole UTF-8
    characters (one byte of a multi-byte character)."""
    of, labels = bytes_of(tok), {}
    for tid in sorted(set(ids)):
        raw = of(tid)
        try:
            labels[tid] = raw.decode("utf-8")
        except UnicodeDecodeError:
            labels[tid] = "".join(f"<{b:02x}>" for b in raw)
    return labels
