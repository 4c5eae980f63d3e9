"""Expert specialisation by data source: how differently the sources of a mixture use the experts.

From routed counts n[s, e] (token-slots of source s that one MoE layer routed to expert e), each
source's expert distribution p_s(e) = n[s, e] / n_s and its weight w_s = n_s / sum_s n_s. The
specialisation score is the generalised Jensen-Shannon divergence of the p_s with weights w
(Lin 1991, "Divergence measures based on the Shannon entropy", eq. 5.1), in bits:

    JSD_w(p_1 .. p_S) = H(sum_s w_s p_s) - sum_s w_s H(p_s)

0 when every source uses the experts in the same proportions; 1 bit for two equal-weight sources
with disjoint experts; at most H(w) <= log2 S. Weighted by routed slots (tokens x experts per
token: token counts for a fixed top-k), sum_s w_s p_s is the layer's pooled load, and the score is
the mutual information between a routed slot's source and its expert.
"""

from __future__ import annotations

import torch


def entropy_bits(p_SE: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row of p_SE (rows sum to 1; 0 log 0 = 0), float64 [S]."""
    p_SE = p_SE.double()
    return -(torch.special.xlogy(p_SE, p_SE).sum(dim=-1)) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def js_divergence(p_SE: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (Lin 1991, eq. 5.1) of the distributions p_SE (rows)
    with weights w_S (summing to 1), in bits, float64 scalar; clamped at 0 against round-off."""
    p_SE, w_S = p_SE.double(), w_S.double()
    mixed_E = w_S @ p_SE
    return (entropy_bits(mixed_E) - (w_S * entropy_bits(p_SE)).sum()).clamp_min(0.0)


def source_distributions(counts_SE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_SE, w_S) of routed counts [S, E]: each source's share of its slots per expert, and its
    share of all slots. A source with no slots has weight 0 and a uniform row (it adds nothing)."""
    counts_SE = counts_SE.double()
    n_S = counts_SE.sum(dim=-1)
    E = counts_SE.shape[-1]
    p_SE = torch.where(n_S[:, None] > 0, counts_SE / n_S.clamp_min(1)[:, None], 1.0 / E)
    return p_SE, n_S / n_S.sum().clamp_min(1)


def specialization_bits(counts_SE: torch.Tensor) -> float:
    """The specialisation score in bits of one layer's routed counts per source [S, E] (module doc)."""
    p_SE, w_S = source_distributions(counts_SE)
    return float(js_divergence(p_SE, w_S))
