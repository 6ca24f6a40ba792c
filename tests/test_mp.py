"""Tests of esdwatch.engine.mp: Marchenko-Pastur law, robust MP fit, Tracy-Widom edge, spikes."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
from scipy.integrate import quad

from esdwatch.engine.mp import (
    DEFAULT_TW_MARGIN,
    MPFit,
    fit_mp,
    mp_cdf,
    mp_edges,
    mp_pdf,
    mp_quantile,
    tracy_widom_scale,
)

QS = (1.0, 2.0, 4.0, 8.0)


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """Small eigvalsh calls are ~10x slower with several BLAS threads on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def gram_evals(W: np.ndarray) -> np.ndarray:
    """Eigenvalues of W^T W (W is N x M with N >= M), unnormalized, ascending."""
    return np.linalg.eigvalsh(W.T @ W)


def spiked(rng, N, M, sigma, thetas):
    """sigma*G + sum_j theta_j sigma sqrt(N) u_j v_j^T, u, v orthonormal; theta normalized."""
    W = sigma * rng.standard_normal((N, M))
    k = len(thetas)
    if k:
        U, _ = np.linalg.qr(rng.standard_normal((N, k)))
        V, _ = np.linalg.qr(rng.standard_normal((M, k)))
        W = W + (U * (np.asarray(thetas) * sigma * math.sqrt(N))) @ V.T
    return W


def lambda_plus_true(N, M, sigma2):
    return N * sigma2 * (1 + 1 / math.sqrt(N / M)) ** 2


# --------------------------------------------------------------------------------------
# 1. The law
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("Q", QS)
def test_edges_formula(Q):
    lo, hi = mp_edges(0.7, Q)
    assert lo == pytest.approx(0.7 * (1 - 1 / math.sqrt(Q)) ** 2, rel=1e-14, abs=1e-300)
    assert hi == pytest.approx(0.7 * (1 + 1 / math.sqrt(Q)) ** 2, rel=1e-14)
    if Q == 1.0:
        assert lo == 0.0 and hi == pytest.approx(2.8)


@pytest.mark.parametrize("Q", QS)
@pytest.mark.parametrize("sigma2", (1.0, 4e-4))
def test_pdf_integrates_to_one_and_has_mean_sigma2(Q, sigma2):
    a, b = mp_edges(sigma2, Q)
    # theta substitution x = a + (b-a) sin^2(theta/2) removes the edge singularities
    jac = lambda t: 0.5 * (b - a) * math.sin(t)  # noqa: E731
    x = lambda t: a + (b - a) * math.sin(0.5 * t) ** 2  # noqa: E731
    mass = quad(lambda t: mp_pdf(x(t), sigma2, Q) * jac(t), 0, math.pi, epsabs=1e-13)[0]
    mean = quad(lambda t: x(t) * mp_pdf(x(t), sigma2, Q) * jac(t), 0, math.pi, epsabs=1e-16)[0]
    assert mass == pytest.approx(1.0, abs=1e-10)
    assert mean == pytest.approx(sigma2, rel=1e-9)
    # plain quad in x as well (integrable 1/sqrt(x) singularity at Q = 1)
    assert quad(lambda t: mp_pdf(t, sigma2, Q), a, b, limit=200)[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(mp_pdf([a - 1e-3 * sigma2, b + 1e-3 * sigma2, -1.0], sigma2, Q) == 0.0)


@pytest.mark.parametrize("Q", QS + (1.0001, 1.5, 100.0))
def test_cdf_matches_integrated_pdf(Q):
    sigma2 = 1.3
    a, b = mp_edges(sigma2, Q)

    def f(t):  # density in theta, x = a + (b - a) sin^2(theta / 2)
        return mp_pdf(a + (b - a) * math.sin(0.5 * t) ** 2, sigma2, Q) * 0.5 * (b - a) * math.sin(t)

    for t in (0.01, 0.3, 1.0, 1.5, 2.2, 3.0, 3.13):
        xv = a + (b - a) * math.sin(0.5 * t) ** 2
        ref = quad(f, 0, t, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        assert float(mp_cdf(xv, sigma2, Q)) == pytest.approx(ref, abs=1e-11)
    F = mp_cdf(np.linspace(a - 1, b + 1, 2001), sigma2, Q)
    assert F[0] == 0.0 and F[-1] == 1.0 and np.all(np.diff(F) >= 0)
    assert mp_cdf(a, sigma2, Q) == 0.0 and mp_cdf(b, sigma2, Q) == 1.0
    assert np.isnan(mp_cdf(np.nan, sigma2, Q))


@pytest.mark.parametrize("Q", QS + (1.0001, 1.5, 100.0))
def test_quantile_inverts_cdf(Q):
    p = np.array([0.0, 1e-12, 1e-6, 1e-3, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999, 1 - 1e-9, 1.0])
    q = mp_quantile(p, Q)
    assert q.shape == p.shape and np.all(np.diff(q) >= 0)
    np.testing.assert_allclose(mp_cdf(q, 1.0, Q), p, atol=1e-12)
    a, b = mp_edges(1.0, Q)
    assert q[0] == a and q[-1] == b
    med = mp_quantile(0.5, Q)
    assert isinstance(med, float) and mp_cdf(med, 1.0, Q) == pytest.approx(0.5, abs=1e-13)
    # scaling: sigma^2 * q is the quantile of the sigma^2 law
    assert mp_cdf(3.0 * med, 3.0, Q) == pytest.approx(0.5, abs=1e-13)


def test_law_rejects_bad_parameters():
    with pytest.raises(ValueError):
        mp_edges(1.0, 0.5)
    with pytest.raises(ValueError):
        mp_pdf(1.0, -1.0, 2.0)
    with pytest.raises(ValueError):
        mp_quantile(0.5, float("nan"))
    with pytest.raises(ValueError):
        fit_mp(np.ones(10), 20, 10, method="nope")
    with pytest.raises(ValueError):
        fit_mp(np.ones(10), 20, 10, tw_margin=float("nan"))
    assert np.isnan(mp_quantile(1.5, 2.0)) and np.isnan(mp_pdf(np.nan, 1.0, 2.0))


def test_tracy_widom_scale_formula():
    mu, s = tracy_widom_scale(400, 200, 2.0)
    a, b = math.sqrt(399.5), math.sqrt(199.5)
    assert mu == pytest.approx(2.0 * (a + b) ** 2, rel=1e-14)
    assert s == pytest.approx(2.0 * (a + b) * (1 / a + 1 / b) ** (1 / 3), rel=1e-14)
    assert tracy_widom_scale(200, 400, 2.0) == (mu, s)  # symmetric
    # the unnormalized TW centre is slightly below the asymptotic edge N (1 + 1/sqrt(Q))^2
    assert mu < lambda_plus_true(400, 200, 2.0)


# --------------------------------------------------------------------------------------
# 2. Gaussian matrices: accurate fit, no false spikes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("Q", (1, 2, 4))
def test_gaussian_fit_accuracy_and_no_false_spikes(Q):
    M, seeds = 256, 40
    N = Q * M
    rng = np.random.default_rng(1000 + Q)
    zero_spikes = 0
    for _ in range(seeds):
        ev1 = gram_evals(rng.standard_normal((N, M)))
        for sigma in (0.02, 1.0):
            # eigenvalues of (sigma G)^T (sigma G), up to rounding: the fit is equivariant
            f = fit_mp(sigma * sigma * ev1, N, M)
            s2 = sigma * sigma
            assert f.ok and f.num_zero == 0 and f.num_deflated in (0, 1)
            assert f.sigma2 == pytest.approx(s2, rel=0.03)
            assert f.lambda_plus == pytest.approx(lambda_plus_true(N, M, s2), rel=0.03)
            assert f.softrank > 0.85
            assert f.ks < 0.05
        zero_spikes += f.num_spikes == 0
    assert zero_spikes >= 0.95 * seeds


def test_fit_fields_are_consistent():
    rng = np.random.default_rng(5)
    N, M = 512, 256
    ev = gram_evals(rng.standard_normal((N, M)) * 0.1)
    f = fit_mp(ev[::-1].copy(), N, M)  # order does not matter
    assert isinstance(f, MPFit) and f.ok and f.num_spikes == 0 and f.num_deflated == 0
    assert (f.N, f.M, f.Q, f.m_eff, f.q_eff) == (N, M, 2.0, 256.0, 2.0)
    assert f.lambda_plus == pytest.approx(N * f.sigma2 * (1 + 1 / math.sqrt(2)) ** 2, rel=1e-12)
    assert f.lambda_minus == pytest.approx(N * f.sigma2 * (1 - 1 / math.sqrt(2)) ** 2, rel=1e-12)
    assert f.tw_scale == pytest.approx(tracy_widom_scale(N, M, f.sigma2)[1], rel=1e-12)
    assert f.spike_threshold == pytest.approx(f.lambda_plus + DEFAULT_TW_MARGIN * f.tw_scale)
    assert f.bulk_max == f.lambda_max == ev[-1] and f.softrank == f.lambda_plus / ev[-1]
    assert f.ks == f.ks_all and 0 <= f.mass_just_above <= f.mass_above_edge < 0.02
    assert fit_mp(ev, M, N) == f  # N < M: swapped
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.sigma2 = 1.0  # frozen


@pytest.mark.parametrize("method", ("median", "ks"))
def test_other_estimators(method):
    rng = np.random.default_rng(11)
    N, M = 512, 256
    ev = gram_evals(spiked(rng, N, M, 0.5, [3.0, 4.0]))
    f = fit_mp(ev, N, M, method=method)
    assert f.method == method and f.num_spikes == 2
    assert f.sigma2 == pytest.approx(0.25, rel=0.03)


# --------------------------------------------------------------------------------------
# 3. Planted spikes (BBP)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("Q", (1, 2, 4))
@pytest.mark.parametrize("k", (1, 3, 5))
def test_planted_spikes_are_counted_and_do_not_bias_sigma2(Q, k):
    M = 256
    N = Q * M
    sigma = 0.05
    rng = np.random.default_rng(10 * Q + k)
    bbp = Q**-0.25  # BBP threshold of the normalized signal strength (units of sigma)
    for _ in range(3):
        thetas = 3.0 * bbp * (1 + 0.25 * np.arange(k))
        ev = gram_evals(spiked(rng, N, M, sigma, thetas))
        f = fit_mp(ev, N, M)
        lp = lambda_plus_true(N, M, sigma**2)
        assert ev[-k] >= 2 * lp  # well separated: every spike at >= 2 lambda_plus
        assert f.num_spikes == k and f.num_deflated == k
        assert f.sigma2 == pytest.approx(sigma**2, rel=0.03)
        assert f.bulk_max == ev[-k - 1] and f.bulk_max < f.spike_threshold < ev[-k]
        assert f.ks < 0.05
    # the naive (trace) estimate is not robust: sum(lambda) / (N M) is inflated by spikes
    if k >= 3:
        assert ev.sum() / (N * M) > 1.05 * sigma**2


@pytest.mark.parametrize("Q", (1, 4))
def test_below_bbp_threshold_is_invisible(Q):
    M = 256
    N = Q * M
    rng = np.random.default_rng(77 + Q)
    clean = 0
    for _ in range(20):
        ev = gram_evals(spiked(rng, N, M, 1.0, 0.5 * Q**-0.25 * np.ones(3)))
        f = fit_mp(ev, N, M)
        assert f.sigma2 == pytest.approx(1.0, rel=0.03)
        clean += f.num_spikes == 0
    assert clean >= 18


def test_many_spikes_deflation():
    """k = 20 strong spikes among M = 256: deflating them keeps sigma2 unbiased."""
    rng = np.random.default_rng(3)
    N = M = 256
    ev = gram_evals(spiked(rng, N, M, 1.0, np.linspace(3, 5, 20)))
    f = fit_mp(ev, N, M)
    assert f.num_spikes == 20 and f.num_deflated == 20 and f.iterations >= 2
    assert f.sigma2 == pytest.approx(1.0, rel=0.04)  # undeflated: +9 % (M = 256, k = 20)
    # the edge is that of the deflated (N - k) x (M - k) bulk
    assert f.lambda_plus == pytest.approx(f.sigma2 * (2 * math.sqrt(N - 20)) ** 2, rel=1e-12)


# --------------------------------------------------------------------------------------
# 4. Heavy tails
# --------------------------------------------------------------------------------------


def test_heavy_tailed_matrix_has_low_softrank_and_poor_mp_fit():
    """Pareto(mu = 2.5) entries (moderately heavy-tailed class): lambda_max is set by the
    largest entries, far above the edge of the fitted bulk. Measured over 150 such
    1024 x 512 matrices: softrank median 0.27 (max 0.66), Gaussian >= 0.978; the median
    bulk ks ratio >= 2.5 and the ks_all ratio >= 4.7 in every group of 5."""
    rng = np.random.default_rng(2024)
    N, M = 1024, 512
    ht, gs = [], []
    for _ in range(5):
        P = (rng.pareto(2.5, size=(N, M)) + 1.0) * rng.choice([-1.0, 1.0], size=(N, M))
        ht.append(fit_mp(gram_evals(P), N, M))
        gs.append(fit_mp(gram_evals(rng.standard_normal((N, M))), N, M))
    assert np.median([f.softrank for f in ht]) < 0.5
    assert max(f.softrank for f in ht) < 0.8 and min(f.softrank for f in gs) > 0.9
    assert np.median([f.ks for f in ht]) > 1.5 * np.median([f.ks for f in gs])
    assert min(f.ks_all for f in ht) > 3 * max(f.ks_all for f in gs)
    assert min(f.num_spikes for f in ht) >= 3 and max(f.num_spikes for f in gs) == 0
    assert min(f.mass_above_edge for f in ht) > 0.02 > max(f.mass_above_edge for f in gs)


# --------------------------------------------------------------------------------------
# 5. Tracy-Widom
# --------------------------------------------------------------------------------------


def test_tracy_widom_fluctuations_of_lambda_max():
    rng = np.random.default_rng(42)
    N, M = 400, 200
    mu, s = tracy_widom_scale(N, M)
    z = np.array([(gram_evals(rng.standard_normal((N, M)))[-1] - mu) / s for _ in range(200)])
    assert abs(z.mean() - (-1.21)) < 0.3
    assert abs(z.std() - 1.27) < 0.3


# --------------------------------------------------------------------------------------
# 6. Degenerate inputs
# --------------------------------------------------------------------------------------


def _is_nan_fit(f):
    return (
        f.num_spikes == -1
        and not f.ok
        and all(
            math.isnan(getattr(f, k))
            for k in ("sigma2", "lambda_plus", "lambda_minus", "ks", "softrank", "spike_threshold")
        )
    )


def test_degenerate_inputs_give_defined_outputs():
    f = fit_mp(np.zeros(64), 128, 64)
    assert _is_nan_fit(f) and f.status == "all_zero" and f.num_zero == 64

    ev = np.zeros(64)
    ev[-1] = 5.0  # rank one
    f = fit_mp(ev, 128, 64)
    assert _is_nan_fit(f) and f.status == "too_few" and f.num_zero == 63 and f.lambda_max == 5.0

    for bad in (np.nan, np.inf):
        ev = np.linspace(1, 2, 64)
        ev[3] = bad
        f = fit_mp(ev, 128, 64)
        assert _is_nan_fit(f) and f.status == "non_finite"

    assert _is_nan_fit(fit_mp([1.0, 2.0, 3.0], 6, 3))
    assert _is_nan_fit(fit_mp([], 6, 3))

    f = fit_mp(np.full(64, 3.0), 128, 64)  # constant spectrum (orthogonal W): defined
    assert f.ok and f.num_spikes == 0 and f.sigma2 > 0 and f.lambda_plus > 3.0 and f.ks > 0.2

    f = fit_mp([1.0, 2.0, 3.0, 4.0], 4, 4)  # smallest admissible sample
    assert f.ok and np.isfinite(f.sigma2)


def test_rank_deficient_matrix_zero_eigenvalues_are_excluded():
    """Dead columns: exact zeros (and eigvalsh's rounding noise around them) are
    excluded, counted, and the remaining spectrum is fitted as N x (M - dead)."""
    rng = np.random.default_rng(9)
    N, M, dead = 512, 256, 40
    W = rng.standard_normal((N, M))
    W[:, :dead] = 0.0
    ev = gram_evals(W)
    f = fit_mp(ev, N, M)
    assert f.ok and f.num_zero == dead and f.m_eff == M - dead
    assert f.sigma2 == pytest.approx(1.0, rel=0.03) and f.num_spikes == 0
    assert f.lambda_plus == pytest.approx(lambda_plus_true(N, M - dead, 1.0), rel=0.03)
    # negative rounding noise counts as zero as well
    ev2 = ev.copy()
    ev2[:dead] = -1e-14 * ev[-1]
    assert fit_mp(ev2, N, M).num_zero == dead
    # inexact zeros: W projected off `dead` random directions (zeros ~ eps * lambda_max),
    # also through a float32 Gram matrix
    V, _ = np.linalg.qr(rng.standard_normal((M, dead)))
    W = rng.standard_normal((N, M))
    W = W - (W @ V) @ V.T
    for dtype in (np.float64, np.float32):
        ev = gram_evals(W.astype(dtype))
        assert ev.dtype == dtype and np.abs(ev[:dead]).max() > 0.0
        f = fit_mp(ev, N, M)
        assert f.num_zero == dead and f.num_spikes == 0
        assert f.sigma2 == pytest.approx(1.0, rel=0.03)


def test_q_equal_one_with_tiny_eigenvalues():
    rng = np.random.default_rng(4)
    N = M = 300
    ev = gram_evals(rng.standard_normal((N, M)) * 3.0)
    assert ev[0] / ev[-1] < 1e-4  # divergent density at 0
    f = fit_mp(ev, N, M)
    assert f.ok and f.lambda_minus == 0.0 and f.num_zero == 0
    assert f.sigma2 == pytest.approx(9.0, rel=0.03)


def test_pooled_conv_slices():
    rng = np.random.default_rng(8)
    N, M = 128, 64
    ev = np.concatenate([gram_evals(rng.standard_normal((N, M)) * 0.1) for _ in range(9)])
    f = fit_mp(ev, N, M)
    assert f.ok and f.sigma2 == pytest.approx(0.01, rel=0.03) and f.m_eff == M


# --------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------


def test_fit_speed_4096_eigenvalues():
    rng = np.random.default_rng(0)
    N, M = 8192, 4096
    # exact MP quantiles as a stand-in for a 8192 x 4096 spectrum (eigvalsh would take s)
    ev = N * 0.01 * mp_quantile((np.arange(M) + 0.5) / M, N / M)
    ev = rng.permutation(np.concatenate([ev[:-3], ev[-1] * np.array([3.0, 5.0, 8.0])]))
    f = fit_mp(ev, N, M)
    assert f.num_spikes == 3 and f.sigma2 == pytest.approx(0.01, rel=0.01)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        fit_mp(ev, N, M)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.010
