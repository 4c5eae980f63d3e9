"""The specialisation score: generalised Jensen-Shannon divergence (Lin 1991) of the sources'
expert distributions, weighted by their routed slots, in bits; checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from moeplat.nn.specialization import entropy_bits, js_divergence, source_distributions, specialization_bits


def test_identical_usage_scores_zero_whatever_the_counts():
    # same proportions (1:2:1), different sizes: p_s identical -> H(mix) = sum w H(p) -> 0
    assert specialization_bits(torch.tensor([[10.0, 20.0, 10.0], [3.0, 6.0, 3.0]])) == pytest.approx(
        0.0, abs=1e-12
    )


def test_two_equal_sources_on_disjoint_experts_score_one_bit():
    # 10 slots each, on experts {0, 1} and {2, 3}: disjoint supports, so JSD = H(w) = H(1/2, 1/2) = 1
    assert specialization_bits(torch.tensor([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 4.0, 6.0]])) == pytest.approx(
        1.0, abs=1e-12
    )


def test_disjoint_sources_score_the_entropy_of_their_weights():
    # disjoint supports: JSD = H(w); w = (3/4, 1/4) -> -(.75 log2 .75 + .25 log2 .25) = 0.811278...
    got = specialization_bits(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert got == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), rel=1e-12)
    assert got == pytest.approx(0.8112781244591328, rel=1e-12)


def test_a_worked_three_expert_example():
    """counts a = (2, 1, 1), b = (0, 2, 2): w = (1/2, 1/2), p_a = (1/2, 1/4, 1/4), p_b = (0, 1/2, 1/2);
    mix = (1/4, 3/8, 3/8); H(mix) = 1/2 + 2 * 3/8 log2(8/3) = 1.561278; H(p_a) = 1.5, H(p_b) = 1;
    JSD = 1.561278 - (1.5 + 1) / 2 = 0.311278 bits."""
    h_mix = 0.25 * 2 + 2 * 0.375 * math.log2(8 / 3)
    want = h_mix - 1.25
    assert want == pytest.approx(0.3112781244591328, rel=1e-12)
    assert specialization_bits(torch.tensor([[2.0, 1.0, 1.0], [0.0, 2.0, 2.0]])) == pytest.approx(
        want, rel=1e-12
    )
    p_SE, w_S = source_distributions(torch.tensor([[2, 1, 1], [0, 2, 2]]))
    assert p_SE.dtype == torch.float64 and p_SE.tolist() == [[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]
    assert w_S.tolist() == [0.5, 0.5]
    assert entropy_bits(p_SE).tolist() == pytest.approx([1.5, 1.0], rel=1e-12)


def test_weights_follow_the_counts_and_three_sources_combine():
    """3 sources on 2 experts: counts (1,0), (0,1), (1,1): w = (1/4, 1/4, 1/2); mix = (1/2, 1/2),
    H(mix) = 1; H(p) = (0, 0, 1) -> JSD = 1 - 1/2 = 1/2 bit."""
    assert specialization_bits(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(
        0.5, rel=1e-12
    )


def test_a_source_without_slots_adds_nothing():
    with_empty = specialization_bits(torch.tensor([[2.0, 1.0, 1.0], [0.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    assert with_empty == pytest.approx(
        specialization_bits(torch.tensor([[2.0, 1.0, 1.0], [0.0, 2.0, 2.0]])), rel=1e-12
    )
    assert specialization_bits(torch.zeros(2, 3)) == 0.0


def test_js_divergence_is_bounded_by_the_weights_entropy_and_symmetric():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p_SE = torch.rand(3, 8, generator=g, dtype=torch.float64) ** 4
        p_SE = p_SE / p_SE.sum(1, keepdim=True)
        w_S = torch.rand(3, generator=g, dtype=torch.float64)
        w_S = w_S / w_S.sum()
        jsd = float(js_divergence(p_SE, w_S))
        assert 0.0 <= jsd <= float(entropy_bits(w_S)) + 1e-12
        perm = torch.tensor([2, 0, 1])
        assert float(js_divergence(p_SE[perm], w_S[perm])) == pytest.approx(jsd, rel=1e-12)
