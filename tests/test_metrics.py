"""Per-layer metrics against closed forms (docs/metrics.md section 4)."""

import math

import numpy as np
import pytest

from esdwatch.engine.metrics import (
    layer_metrics,
    log_alpha_norm,
    log_norm,
    log_spectral_norm,
    matrix_entropy,
    numerical_rank,
    rank_collapse_fraction,
    stable_rank,
)


def _evals(W):
    return np.sort(np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2)


def test_identity_closed_forms():
    M = 64
    ev = _evals(np.eye(M))
    assert stable_rank(ev) == pytest.approx(M)
    rank = numerical_rank(ev, M)
    assert rank == M
    assert matrix_entropy(ev, rank) == pytest.approx(1.0, abs=1e-12)
    assert log_norm(ev) == pytest.approx(math.log10(M))
    assert log_spectral_norm(ev) == pytest.approx(0.0, abs=1e-12)
    assert rank_collapse_fraction(ev) == 0.0


def test_rank_one_closed_forms():
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((120, 1)), rng.standard_normal((1, 80))
    ev = _evals(u @ v)
    assert stable_rank(ev) == pytest.approx(1.0, rel=1e-9)
    rank = numerical_rank(ev, 120)
    assert rank == 1
    assert matrix_entropy(ev, rank) == 0.0
    assert rank_collapse_fraction(ev) == pytest.approx(79 / 80)
    # ||u v^T||_2^2 = ||u||^2 ||v||^2
    expected = math.log10(float(np.sum(u**2) * np.sum(v**2)))
    assert log_spectral_norm(ev) == pytest.approx(expected, rel=1e-12)
    assert log_norm(ev) == pytest.approx(expected, rel=1e-9)


def test_orthogonal_scaled_matrix():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((200, 100)))
    ev = _evals(3.0 * q)
    np.testing.assert_allclose(ev, 9.0, rtol=1e-10)
    assert matrix_entropy(ev, numerical_rank(ev, 200)) == pytest.approx(1.0, abs=1e-10)
    assert stable_rank(ev) == pytest.approx(100.0)


def test_entropy_of_known_distribution():
    # two equal eigenvalues among rank 2: entropy ln 2 / ln 2 = 1; 3:1 split
    ev = np.array([3.0, 1.0])
    p = np.array([0.75, 0.25])
    assert matrix_entropy(ev, 2) == pytest.approx(float(-(p * np.log(p)).sum() / math.log(2)))


def test_log_alpha_norm_closed_form_and_overflow_safety():
    ev = np.array([1.0, 2.0, 4.0])
    assert log_alpha_norm(ev, 2.0) == pytest.approx(math.log10(1 + 4 + 16))
    huge = np.array([1e8, 2e8])
    value = log_alpha_norm(huge, 60.0)  # 1e480 overflows float64; log space does not
    assert value == pytest.approx(60 * math.log10(2e8) + math.log10(1 + 2.0**-60), rel=1e-12)


def test_zero_and_empty_inputs():
    zeros = np.zeros(10)
    assert math.isnan(log_norm(zeros)) and math.isnan(stable_rank(zeros))
    assert math.isnan(matrix_entropy(zeros, 0))
    assert rank_collapse_fraction(zeros) == 1.0
    assert math.isnan(rank_collapse_fraction(np.array([])))


def test_layer_metrics_all_fields_consistent():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((400, 200)) / math.sqrt(400)
    ev = _evals(W)
    m = layer_metrics(ev, 400, 200)
    assert m["num_evals"] == 200
    assert m["lambda_max"] == pytest.approx(ev[-1])
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(ev[-1]))
    assert m["log_alpha_norm"] == pytest.approx(math.log10(np.sum(ev ** m["alpha"])), rel=1e-10)
    assert 0.0 < m["entropy"] <= 1.0
    assert m["mp_softrank"] == pytest.approx(m["lambda_plus"] / ev[-1])
    # a Gaussian matrix: MP edge near (1 + 1/sqrt(2))^2 in units of N sigma^2 = 1
    assert m["lambda_plus"] == pytest.approx((1 + 1 / math.sqrt(2)) ** 2, rel=0.05)
    assert m["num_spikes"] == 0


def test_layer_metrics_all_zero_matrix():
    m = layer_metrics(np.zeros(60), 100, 60)
    assert m["lambda_max"] == 0.0
    assert "alpha" not in m
    assert m["rank_collapse_fraction"] == 1.0
