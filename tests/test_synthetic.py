"""Seeded generators of matrices of known phase (esdwatch.engine.synthetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esdwatch.engine import synthetic
from esdwatch.engine.phases import Phase

ALL = [p for p in Phase if p is not Phase.UNKNOWN]


def top_evals(W: torch.Tensor) -> np.ndarray:
    if W.shape[0] < W.shape[1]:
        W = W.T
    return torch.linalg.eigvalsh(W.T @ W).numpy()


@pytest.mark.parametrize("phase", ALL, ids=lambda p: p.value)
def test_shape_dtype_and_seeding(phase):
    N, M = 512, 256
    a = synthetic.make_phase_matrix(phase, N, M, seed=7)
    assert a.shape == (N, M) and a.dtype == torch.float64
    assert torch.equal(a, synthetic.make_phase_matrix(phase, N, M, seed=7))
    assert not torch.equal(a, synthetic.make_phase_matrix(phase, N, M, seed=8))
    assert bool(torch.isfinite(a).all())
    # N < M gives the transpose orientation; sigma scales; dtype is honoured
    b = synthetic.make_phase_matrix(phase, M, N, seed=7)
    assert b.shape == (M, N)
    assert torch.allclose(b, a.T)
    c = synthetic.make_phase_matrix(phase, N, M, seed=7, sigma=0.01)
    assert torch.allclose(c, 0.01 * a)
    gen = synthetic.GENERATORS[phase.value]
    assert gen(N, M, 7, dtype=torch.float32).dtype == torch.float32


def test_make_phase_matrix_accepts_names():
    ref = synthetic.make_phase_matrix(Phase.BULK_PLUS_SPIKES, 200, 100, seed=1)
    for name in ("Bulk+Spikes", "bulk+spikes", "BULK_PLUS_SPIKES"):
        assert torch.equal(synthetic.make_phase_matrix(name, 200, 100, seed=1), ref)
    with pytest.raises(ValueError):
        synthetic.make_phase_matrix("Unknown", 200, 100)
    with pytest.raises(ValueError):
        synthetic.make_phase_matrix("nonsense", 200, 100)


def test_bbp_formulas_are_inverse():
    for N, M in ((1000, 1000), (2000, 250)):
        c = M / N
        assert synthetic.bbp_threshold(N, M) == pytest.approx(c**0.25)
        assert synthetic.outlier_rel(0.99 * c**0.25, N, M) == 0.0  # below threshold: no outlier
        for rel in (0.01, 0.3, 5.0):
            theta = synthetic.theta_for_rel(rel, N, M)
            assert theta > c**0.25
            assert synthetic.outlier_rel(theta, N, M) == pytest.approx(rel, rel=1e-10)
    with pytest.raises(ValueError):
        synthetic.theta_for_rel(0.0, 100, 100)


def test_random_like_has_mp_moments():
    for dist in ("gaussian", "uniform", "rademacher"):
        W = synthetic.random_like(400, 200, seed=1, sigma=3.0, dist=dist)
        assert float(W.var()) == pytest.approx(9.0, rel=0.03)
        assert float(W.mean()) == pytest.approx(0.0, abs=0.05)
    with pytest.raises(ValueError):
        synthetic.random_like(10, 10, dist="cauchy")


def test_spikes_land_where_bbp_says():
    N, M, rel = 1000, 500, 2.0
    ev = top_evals(synthetic.bulk_plus_spikes(N, M, seed=3, rank=2, rel=rel))
    lam_plus = N * (1 + math.sqrt(M / N)) ** 2
    # the asymptotic BBP position, up to finite-size fluctuations (~5% here)
    assert ev[-1] / lam_plus - 1 == pytest.approx(rel, rel=0.1)
    assert ev[-2] / lam_plus - 1 == pytest.approx(rel, rel=0.1)
    assert ev[-3] < 1.05 * lam_plus  # the rest is bulk


def test_bleeding_out_window_and_errors():
    lo, hi = synthetic.bleeding_window(2000, 1000)
    assert 0 < lo < hi == synthetic.BLEED_MAX_REL
    lo_small, _ = synthetic.bleeding_window(128, 50)
    assert lo_small > lo  # TW fluctuations are relatively wider for small matrices
    with pytest.raises(ValueError, match="not distinguishable"):
        synthetic.bleeding_out(128, 50, seed=0)
    W = synthetic.bleeding_out(128, 50, seed=0, rel=0.2)  # explicit rel is always allowed
    assert W.shape == (128, 50)


def test_bulk_decay_has_a_continuum_and_no_giant_spike():
    N, M = 600, 300
    ev = top_evals(synthetic.bulk_decay(N, M, seed=2, top_rel=4.0))
    lam_plus = N * (1 + math.sqrt(M / N)) ** 2
    above = ev[ev > 1.02 * lam_plus]
    assert len(above) >= 8
    assert ev[-1] < 7 * lam_plus
    assert ((above > 1.02 * lam_plus) & (above < 1.5 * lam_plus)).sum() >= 2


def test_heavy_tailed_entries_have_the_pareto_tail():
    W = synthetic.heavy_tailed(400, 400, seed=1, mu=1.5).abs().numpy().ravel()
    # P(|x| > t) = t^-mu for t >= 1
    assert W.min() >= 1.0
    for t in (2.0, 10.0):
        assert (W > t).mean() == pytest.approx(t**-1.5, rel=0.1)
    with pytest.raises(ValueError):
        synthetic.heavy_tailed(10, 10, mu=0)


def test_rank_collapse_modes():
    N, M = 300, 120
    W = synthetic.rank_collapse(N, M, seed=1, mode="low_rank", rank=10)
    ev = np.sort(top_evals(W))
    assert ev[-10] > 1e6 * ev[-11]  # 10 signal eigenvalues, 110 at the noise level
    W = synthetic.rank_collapse(N, M, seed=1, mode="dead_units", dead_fraction=0.5)
    dead = (W.abs().amax(dim=0) == 0).sum().item()
    assert dead == 60
    with pytest.raises(ValueError):
        synthetic.rank_collapse(N, M, mode="other")
