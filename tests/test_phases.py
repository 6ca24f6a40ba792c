"""The 5+1 phase classifier: enum, rules on synthetic ground truth, bad input, report glue."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from esdwatch.engine import synthetic
from esdwatch.engine.phases import (
    DEFAULT_THRESHOLDS,
    Phase,
    PhaseResult,
    PhaseThresholds,
    classify,
    classify_report,
    tail_comparison,
)


def evals_of(W: torch.Tensor) -> np.ndarray:
    """The M = min(N, M) eigenvalues of W^T W (never the structural zeros)."""
    W = W.to(torch.float64)
    if W.shape[0] < W.shape[1]:
        W = W.T
    return torch.linalg.eigvalsh(W.T @ W).clamp_min(0).numpy()


def classify_matrix(W: torch.Tensor, **kw) -> PhaseResult:
    N, M = max(W.shape), min(W.shape)
    return classify(evals_of(W), N, M, **kw)


# ---------------------------------------------------------------------------- the enum


def test_phase_values_are_the_paper_names():
    assert [p.value for p in Phase] == [
        "Random-like",
        "Bleeding-out",
        "Bulk+Spikes",
        "Bulk-decay",
        "Heavy-Tailed",
        "Rank-collapse",
        "Unknown",
    ]
    assert Phase.BULK_PLUS_SPIKES == "Bulk+Spikes"  # str enum: compares equal to its value
    assert str(Phase.HEAVY_TAILED) == "Heavy-Tailed"
    assert Phase("Bulk-decay") is Phase.BULK_DECAY


def test_phase_order_and_comparison():
    ordered = [
        Phase.RANDOM_LIKE,
        Phase.BLEEDING_OUT,
        Phase.BULK_PLUS_SPIKES,
        Phase.BULK_DECAY,
        Phase.HEAVY_TAILED,
        Phase.RANK_COLLAPSE,
    ]
    assert [p.order for p in ordered] == list(range(6))
    assert Phase.UNKNOWN.order == -1 and Phase.UNKNOWN.ordinal == -1
    assert sorted(reversed(ordered)) == ordered
    assert Phase.RANDOM_LIKE < Phase.HEAVY_TAILED <= Phase.HEAVY_TAILED < Phase.RANK_COLLAPSE
    assert Phase.BULK_DECAY > Phase.BULK_PLUS_SPIKES >= Phase.BLEEDING_OUT
    assert Phase.UNKNOWN < Phase.RANDOM_LIKE
    assert len({p: 1 for p in Phase}) == 7  # hashable
    with pytest.raises(TypeError):
        Phase.RANDOM_LIKE < 3  # noqa: B015


def test_phase_parse():
    assert Phase.parse("bulk+spikes") is Phase.BULK_PLUS_SPIKES
    assert Phase.parse("HEAVY_TAILED") is Phase.HEAVY_TAILED
    assert Phase.parse(Phase.UNKNOWN) is Phase.UNKNOWN
    with pytest.raises(ValueError):
        Phase.parse("very good")


# ------------------------------------------------------------------ synthetic ground truth

SHAPES = [(256, 256), (512, 256), (512, 128)]


@pytest.mark.parametrize("phase", [p for p in Phase if p is not Phase.UNKNOWN], ids=lambda p: p.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_generators_are_classified_as_their_phase(phase, shape):
    N, M = shape
    for seed in (1, 2):
        res = classify_matrix(synthetic.make_phase_matrix(phase, N, M, seed=seed))
        assert res.phase is phase, (seed, res.reason)
        assert 0.0 <= res.confidence <= 1.0
        assert res.reason


def test_phase_is_scale_free_and_orientation_free():
    W = synthetic.bulk_plus_spikes(300, 120, seed=5)
    base = classify_matrix(W)
    for scale in (1e-4, 1e3):
        res = classify_matrix(W * scale)
        assert res.phase is base.phase
        assert res.confidence == pytest.approx(base.confidence, abs=1e-6)
    assert classify_matrix(W.T).phase is base.phase


def test_bleeding_out_sits_between_random_and_spikes():
    # the same rank-one signal moved from inside the bulk through the BBP transition
    N, M = 512, 256
    phases = []
    for rel in (None, 0.17, 2.0):
        if rel is None:
            W = synthetic.random_like(N, M, seed=3, dist="gaussian")
        else:
            W = synthetic.bleeding_out(N, M, seed=3, rank=1, rel=rel)
        phases.append(classify_matrix(W).phase)
    assert phases == [Phase.RANDOM_LIKE, Phase.BLEEDING_OUT, Phase.BULK_PLUS_SPIKES]


def test_evidence_fields():
    N, M = 512, 256
    res = classify_matrix(synthetic.bulk_plus_spikes(N, M, seed=4, rank=2, rel=3.0))
    assert res.phase is Phase.BULK_PLUS_SPIKES
    assert res.N == N and res.M == M and res.num_evals == M
    assert res.sigma2 == pytest.approx(1.0, rel=0.05)
    # the MP fit deflates the 2 spikes: the bulk is that of a (N - 2) x (M - 2) matrix
    assert res.lambda_plus == pytest.approx(N * res.sigma2 * (1 + math.sqrt(M / N)) ** 2, rel=0.01)
    assert res.tw_scale > 0 and res.mp_ks < 0.1
    assert res.num_spikes == 2 and res.num_near_edge == 0 and res.num_above_edge == 2
    assert res.mass_above_edge == pytest.approx(2 / M)
    assert res.edge_ratio == pytest.approx(4.0, rel=0.1)
    assert res.max_edge_distance == pytest.approx((res.lambda_max - res.lambda_plus) / res.tw_scale)
    assert math.isfinite(res.alpha) and math.isfinite(res.D)
    assert res.near_zero_fraction == 0.0
    d = res.to_dict()
    assert d["phase"] == "Bulk+Spikes"
    json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()})


def test_heavy_tailed_evidence_prefers_a_power_law():
    res = classify_matrix(synthetic.heavy_tailed(512, 256, seed=1, mu=1.5))
    assert res.phase is Phase.HEAVY_TAILED
    assert res.alpha < 3 and res.edge_ratio > 30 and res.mass_above_edge > 0.1
    assert res.tail_llr > 0  # power law beats an exponential on the tail


def test_tail_comparison_signs():
    rng = np.random.default_rng(0)
    pareto = (1 - rng.random(2000)) ** (-1 / 1.5)  # alpha = 2.5 density tail
    s, p = tail_comparison(pareto, 1.0, 2.5)
    assert s > 3 and p < 0.01
    expo = 1.0 + rng.exponential(1.0, 2000)
    alpha = 1 + expo.size / np.log(expo).sum()
    s, p = tail_comparison(expo, 1.0, alpha)
    assert s < -3
    assert all(math.isnan(v) for v in tail_comparison(expo, 1.0, float("nan")))


# ---------------------------------------------------------------------------- rank collapse


def test_rank_collapse_is_checked_first_and_needs_a_separated_zero_spike():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((400, 200))
    W[:, :60] = 0.0  # 30% dead input units
    res = classify_matrix(torch.from_numpy(W))
    assert res.phase is Phase.RANK_COLLAPSE
    assert res.near_zero_fraction == pytest.approx(0.3)
    assert res.zero_gap == math.inf
    W[:, :60] = rng.standard_normal((400, 60))
    W[:, :20] = 0.0  # 10% dead: a defect, not a collapse of the layer
    assert classify_matrix(torch.from_numpy(W)).phase is Phase.RANDOM_LIKE


def test_very_heavy_tailed_bulk_is_not_rank_collapse():
    # Pareto mu = 1: the continuous bulk lies ~6 decades below lambda_max, so many
    # eigenvalues are "numerically zero" relative to lambda_max, but not a spike at 0
    res = classify_matrix(synthetic.heavy_tailed(256, 256, seed=3, mu=1.0))
    assert res.near_zero_fraction > DEFAULT_THRESHOLDS.collapse_fraction
    assert res.zero_gap < DEFAULT_THRESHOLDS.collapse_gap
    assert res.phase is Phase.HEAVY_TAILED


@pytest.mark.parametrize("shape", [(1000, 100), (100, 1000), (300, 299)])
def test_structural_zeros_of_a_rectangular_matrix_are_not_collapse(shape):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = classify_matrix(W)  # the M eigenvalues only
    assert res.phase is Phase.RANDOM_LIKE
    assert res.near_zero_fraction == 0.0


def test_structural_zeros_through_analyze_matrix():
    from esdwatch.engine.analyzer import analyze_matrix

    W = torch.randn(100, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rep = analyze_matrix(W, traps=False)
    assert rep.phase == "Random-like"
    assert rep.rank_collapse_fraction == 0.0 and rep.num_evals == 100


def test_all_zero_is_rank_collapse():
    res = classify(np.zeros(100), 200, 100)
    assert res.phase is Phase.RANK_COLLAPSE and res.confidence == 1.0
    assert "all-zero" in res.reason
    res = classify(np.zeros(10), 20, 10)  # at any size
    assert res.phase is Phase.RANK_COLLAPSE


# ------------------------------------------------------------------------------ bad input


def test_non_finite_is_unknown():
    ev = evals_of(synthetic.random_like(200, 100, seed=0))
    for bad in (np.nan, np.inf):
        ev2 = ev.copy()
        ev2[5] = bad
        res = classify(ev2, 200, 100)
        assert res.phase is Phase.UNKNOWN and res.confidence == 0.0
        assert "non-finite" in res.reason


def test_too_small_is_unknown():
    W = synthetic.random_like(60, 30, seed=0)
    res = classify_matrix(W)
    assert res.phase is Phase.UNKNOWN and "min_evals" in res.reason
    assert classify(np.array([]), 10, 10).phase is Phase.UNKNOWN
    # the floor is a threshold
    assert classify_matrix(W, thresholds=PhaseThresholds(min_evals=20)).phase is Phase.RANDOM_LIKE


def test_negative_eigenvalues_are_unknown_but_rounding_is_tolerated():
    ev = evals_of(synthetic.random_like(200, 100, seed=0))
    ev_round = ev.copy()
    ev_round[0] = -1e-14 * ev.max()
    assert classify(ev_round, 200, 100).phase is Phase.RANDOM_LIKE
    ev_neg = ev.copy()
    ev_neg[0] = -0.5 * ev.max()
    assert classify(ev_neg, 200, 100).phase is Phase.UNKNOWN


def test_accepts_torch_unsorted_and_swapped_shape():
    ev = evals_of(synthetic.bulk_plus_spikes(300, 100, seed=2))
    a = classify(ev, 300, 100)
    b = classify(torch.from_numpy(np.random.default_rng(0).permutation(ev)), 100, 300)
    assert a.phase is b.phase and a.lambda_plus == pytest.approx(b.lambda_plus)


def test_pooled_slices():
    # 9 conv-like slices of the same shape pooled into one ESD stay Random-like
    W = torch.randn(9, 128, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ev = torch.linalg.eigvalsh(W.transpose(1, 2) @ W).reshape(-1).numpy()
    res = classify(ev, 128, 64)
    assert res.num_evals == 9 * 64 and res.phase is Phase.RANDOM_LIKE


# ------------------------------------------------------------------------ thresholds, glue


def test_thresholds_are_configurable():
    W = synthetic.bulk_plus_spikes(256, 256, seed=1, rank=1, rel=2.0)
    assert classify_matrix(W).phase is Phase.BULK_PLUS_SPIKES
    # a huge TW margin sees no eigenvalue above the edge
    assert classify_matrix(W, thresholds=PhaseThresholds(tw_margin=1e6)).phase is Phase.RANDOM_LIKE
    # a spike threshold beyond the spike makes it "just above the edge"
    assert classify_matrix(W, thresholds=PhaseThresholds(spike_rel=5.0)).phase is Phase.BLEEDING_OUT
    assert dataclasses.replace(DEFAULT_THRESHOLDS, ht_alpha=5).ht_alpha == 5


def test_classify_report_fills_the_phase_fields():
    from esdwatch.engine.analyzer import analyze_matrix

    W = synthetic.heavy_tailed(300, 150, seed=2, mu=1.3)
    rep = analyze_matrix(W, traps=False, keep_evals=True)
    assert rep.phase == "Heavy-Tailed"
    assert 0 <= rep.phase_confidence <= 1 and rep.phase_reason
    assert rep.mass_above_edge > 0.05 and rep.num_near_edge >= 0
    assert rep.edge_ratio > 10 and math.isfinite(rep.max_edge_distance)
    # classify_report reuses the report's power-law fit and agrees with classify
    again = classify_report(rep.replace(phase="unknown"), rep.evals)
    assert again.phase == rep.phase
    assert classify(rep.evals, rep.N, rep.M).phase.value == rep.phase
    json.dumps(rep.to_dict())


@pytest.mark.parametrize(
    "generator", ["random_like", "bleeding_out", "bulk_plus_spikes", "bulk_decay", "heavy_tailed", "rank_collapse"]
)
def test_a_shared_mp_fit_gives_the_same_decision(generator):
    from esdwatch.engine.mp import fit_mp
    from esdwatch.engine.spectrum import eigenvalues

    for seed in (0, 1):
        W = getattr(synthetic, generator)(600, 300, seed)
        ev = eigenvalues(W).numpy()
        own, shared = classify(ev, 600, 300), classify(ev, 600, 300, mp=fit_mp(ev, 600, 300))
        assert (own.phase, own.confidence, own.reason) == (shared.phase, shared.confidence, shared.reason)
