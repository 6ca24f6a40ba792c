"""The tail path (esdwatch.engine.tail): certificate, x_min rule, auto crossover, large shapes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from esdwatch.engine.analyzer import analyze, analyze_matrix
from esdwatch.engine.layers import LayerMatrix
from esdwatch.engine.metrics import rank_collapse_fraction
from esdwatch.engine.powerlaw import fit_power_law
from esdwatch.engine.synthetic import heavy_tailed, power_law_spikes, rank_collapse
from esdwatch.engine.tail import (
    AUTO_MIN_M,
    pseudo_spectrum,
    tail_spectrum,
    top_spectrum,
    uses_tail,
)


def _with_spectrum(values: np.ndarray, N: int, seed: int = 0) -> torch.Tensor:
    """An N x M matrix whose W^T W has exactly the eigenvalues ``values``."""
    rng = np.random.default_rng(seed)
    M = values.size
    U = np.linalg.qr(rng.standard_normal((N, M)))[0]
    V = np.linalg.qr(rng.standard_normal((M, M)))[0]
    return torch.from_numpy((U * np.sqrt(values)) @ V.T)


def test_certificate_refuses_a_cluster_that_a_naive_top_k_gets_wrong():
    # 8 well-separated top eigenvalues, then a tight cluster around the 9th-12th: a
    # top-k with few iterations reports the cluster's values with large errors; the
    # certified count stops before the cluster until its residual bounds are small.
    M = 300
    top = np.array([100.0, 80, 64, 50, 40, 32, 25, 20])
    cluster = 10.0 + 1e-3 * np.arange(8)
    rest = np.linspace(0.1, 5.0, M - top.size - cluster.size)
    values = np.concatenate([top, cluster, rest])
    W = _with_spectrum(values, 500)
    exact = np.sort(values)[::-1]

    naive = torch.svd_lowrank(W, q=12, niter=1)[1].double().square().numpy()
    assert np.max(np.abs(naive - exact[:12]) / exact[:12]) > 1e-3  # the naive top-12 is off

    # a short run: the cluster's Ritz values (as naive as the top-k above) are not certified
    short = top_spectrum(W, dtype=torch.float64, block=4, first_check=24, rtol=1e-6)
    c = short.num_certified
    assert c < 12
    assert np.max(np.abs(short.ritz[:12] - exact[:12]) / exact[:12]) > 1e-6
    # grown until 16 are certified: every certified value is within its bound and rtol
    ts = top_spectrum(
        W, dtype=torch.float64, block=4, first_check=24, rtol=1e-6, stop=lambda cur, prev: cur.num_certified >= 16
    )
    c = ts.num_certified
    assert c >= 16
    err = np.abs(ts.values - exact[:c])
    assert np.all(err <= ts.bounds + 1e-12 * exact[0])
    assert np.all(err <= 1e-6 * exact[:c])


def _power_law_over_bulk(M: int = 700, K: int = 30, N: int = 1500) -> torch.Tensor:
    """K power-law tail eigenvalues (alpha = 3) above a uniform bulk: the CSN x_min is the
    tail's lowest value (n_tail = K), with a gap below it (float32, like real weights)."""
    rng = np.random.default_rng(0)
    values = np.concatenate([(K / np.arange(1, K + 1)) ** 0.5, rng.uniform(0.01, 0.5, M - K)])
    return _with_spectrum(values, N).float()


def test_tail_fit_equals_the_full_scan():
    W = _power_law_over_bulk()
    full = fit_power_law(torch.linalg.eigvalsh(W.double().T @ W.double()))
    assert full.n_tail == 30
    ts = tail_spectrum(W)
    assert ts.xmin_certified and not ts.complete and ts.basis < 700
    assert ts.fit is not None and ts.fit.n_tail == full.n_tail
    assert abs(ts.fit.alpha - full.alpha) < 1e-4
    # a long heavy tail is not certified within a small basis: no answer rather than a wrong one
    H = heavy_tailed(1500, 700, seed=1, mu=3.0, dtype=torch.float32)
    capped = tail_spectrum(H, max_basis=128)
    assert not capped.xmin_certified


def test_power_law_spikes_give_a_short_tail_of_known_length():
    W = power_law_spikes(2048, 2048, num_spikes=60, dtype=torch.float32)
    full = fit_power_law(torch.linalg.eigvalsh(W.double().T @ W.double()))
    # the fit finds the spikes (not the bulk): about num_spikes values, alpha near 3
    assert 30 <= full.n_tail <= 66
    assert 2.0 <= full.alpha <= 4.0
    with pytest.raises(ValueError, match="num_spikes"):
        power_law_spikes(100, 50, num_spikes=0)


def test_tail_path_certifies_a_spiked_tail_and_gives_up_on_a_long_one():
    W = power_law_spikes(2048, 2048, num_spikes=60, dtype=torch.float32)
    full = fit_power_law(torch.linalg.eigvalsh(W.double().T @ W.double()))
    ts = tail_spectrum(W, max_basis=512)
    assert ts.xmin_certified and not ts.complete and ts.basis <= 512
    assert ts.fit is not None and ts.fit.n_tail == full.n_tail
    assert abs(ts.fit.alpha - full.alpha) < 1e-5
    assert math.isclose(ts.fit.xmin, full.xmin, rel_tol=1e-5)
    # i.i.d. Pareto entries: the pseudo-spectrum's scan puts ~900 of 2048 values in the
    # tail at the first checkpoint, more than a third of the cap: the rule gives up there
    # instead of growing the basis to the cap for nothing
    H = heavy_tailed(2048, 2048, seed=0, mu=2.2, dtype=torch.float32)
    given_up = tail_spectrum(H, max_basis=512)
    assert not given_up.xmin_certified
    assert given_up.basis == 128


def test_pseudo_spectrum_keeps_the_exact_trace_and_top():
    W = heavy_tailed(1200, 500, seed=3, mu=3.0, dtype=torch.float32)
    ts = top_spectrum(W, first_check=128)
    ps = pseudo_spectrum(ts)
    assert ps.size == 500
    assert math.isclose(ps.sum(), float(W.double().square().sum()), rel_tol=1e-6)
    assert np.allclose(ps[::-1][: ts.num_certified], ts.values)


def test_auto_crossover_by_size_and_device():
    small = LayerMatrix(name="s", kind="linear", module_type="t", weight=torch.zeros(1, 3000, AUTO_MIN_M["cpu"] - 1))
    large = LayerMatrix(name="l", kind="linear", module_type="t", weight=torch.zeros(1, 3000, AUTO_MIN_M["cpu"]))
    assert not uses_tail(small, "auto")
    assert uses_tail(large, "auto")
    assert not uses_tail(large, "auto", device="cuda")  # the GPU's dense solver is fast up to larger M
    assert uses_tail(small, "tail") and not uses_tail(large, "exact")
    stack = LayerMatrix(name="c", kind="conv2d", module_type="t", weight=torch.zeros(9, 4096, 4096))
    assert not uses_tail(stack, "tail")  # stacks of slices stay exact
    with pytest.raises(ValueError, match="spectrum"):
        analyze_matrix(torch.randn(60, 50), spectrum="fast")


def test_tail_report_marks_estimated_metrics():
    W = _power_law_over_bulk()
    exact = analyze_matrix(W, spectrum="exact")
    tail = analyze_matrix(W, spectrum="tail")
    assert exact.spectrum == "exact" and exact.estimated == ""
    assert tail.spectrum == "tail"
    assert "entropy" in tail.estimated.split(",") and "alpha" not in tail.estimated.split(",")
    assert tail.n_tail == exact.n_tail and abs(tail.alpha - exact.alpha) < 1e-4
    assert math.isclose(tail.log_norm, exact.log_norm, rel_tol=1e-6)
    assert math.isclose(tail.lambda_max, exact.lambda_max, rel_tol=1e-5)
    assert (tail.num_traps > 0) == (exact.num_traps > 0)
    assert abs(tail.entropy - exact.entropy) < 0.02
    assert abs(tail.mp_softrank - exact.mp_softrank) < 0.05 * exact.mp_softrank


def test_auto_decomposes_tall_matrices_by_the_mixed_route():
    # N = 2M: the float32 product (a heavy tail holding a third of the spectrum is not
    # certified within M / 8 vectors, so every eigenvalue is computed), with the float64
    # path's fit (x_min equal, alpha within 1e-6) and phase; a square matrix keeps float64
    W = heavy_tailed(2 * AUTO_MIN_M["cpu"], AUTO_MIN_M["cpu"], seed=1, mu=3.0, dtype=torch.float32)
    exact = analyze_matrix(W, spectrum="exact", traps=False, keep_evals=True)
    auto = analyze_matrix(W, spectrum="auto", traps=False, keep_evals=True)
    assert auto.spectrum == "exact" and auto.estimated == ""
    assert 0 < np.abs(auto.evals - exact.evals).max() <= 1e-6 * exact.lambda_max
    assert auto.xmin == pytest.approx(exact.xmin, rel=1e-6) and auto.n_tail == exact.n_tail
    assert abs(auto.alpha - exact.alpha) < 1e-6 and auto.phase == exact.phase
    assert auto.rank_collapse_fraction == exact.rank_collapse_fraction
    square = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    same = (analyze_matrix(square, spectrum=s, traps=False, keep_evals=True).evals for s in ("auto", "exact"))
    assert np.array_equal(*same)


def test_auto_takes_the_float64_product_when_the_tail_attempt_saw_a_null_space(monkeypatch):
    # a tall rank-collapsed matrix whose rank is below the tail attempt's basis: the attempt's
    # smallest Ritz value (an upper bound of the smallest eigenvalue) is ~0, so the dense
    # fallback goes straight to the float64 product instead of the mixed route + its guard
    from esdwatch.engine import spectrum

    monkeypatch.setitem(AUTO_MIN_M, "cpu", 64)
    products: list[type] = []
    real = spectrum._blas_piece_eigenvalues
    monkeypatch.setattr(
        spectrum, "_blas_piece_eigenvalues", lambda piece, scale, dt: products.append(dt) or real(piece, scale, dt)
    )
    collapsed = rank_collapse(1200, 500, seed=1, mode="low_rank", rank=40, dtype=torch.float32)
    report = analyze_matrix(collapsed, spectrum="auto", traps=False)
    assert report.phase == "Rank-collapse" and report.spectrum == "exact"
    assert products == [np.float64]
    # a rank above the basis is not seen by the attempt: mixed first, then the guard's float64
    products.clear()
    analyze_matrix(
        rank_collapse(1200, 500, seed=1, mode="low_rank", rank=300, dtype=torch.float32), spectrum="auto", traps=False
    )
    assert products == [np.float32, np.float64]
    products.clear()
    analyze_matrix(heavy_tailed(1200, 500, seed=1, mu=3.0, dtype=torch.float32), spectrum="auto", traps=False)
    assert products == [np.float32]


def test_rank_collapse_detected_on_the_tail_path():
    # the quadrature bulk of a capped tail run finds the collapsed share (low rank and dead units)
    for W in (
        rank_collapse(6000, 2400, seed=1, mode="low_rank", rank=200, dtype=torch.float32),
        rank_collapse(6000, 2400, seed=2, mode="dead_units", dead_fraction=0.6, dtype=torch.float32),
    ):
        ev = torch.linalg.eigvalsh(W.double().T @ W.double()).numpy()
        exact = rank_collapse_fraction(np.clip(ev, 0, None))
        ts = top_spectrum(W, first_check=256)  # a basis above the rank (see the module docstring)
        assert not ts.complete
        estimate = rank_collapse_fraction(pseudo_spectrum(ts))
        assert exact > 0.5 and abs(estimate - exact) < 0.02
    # and through the analyzer's tail path, where the layer falls back or not, collapse is seen
    report = analyze_matrix(rank_collapse(3000, 1200, seed=1, mode="low_rank", rank=40), spectrum="tail", traps=False)
    assert report.rank_collapse_fraction > 0.9 and report.phase == "Rank-collapse"


def test_large_embedding_is_analysed_not_skipped():
    # N > 50,000 (weightwatcher's cap) with a small M: analysed, nothing skipped for size
    emb = nn.Embedding(50304, 64)
    report = analyze(nn.Sequential(emb), spectrum="auto", traps=False)
    assert not report.skipped
    (layer,) = report.layers
    assert layer.ok and layer.N == 50304 and layer.M == 64


def test_max_evals_routes_to_the_tail_path_instead_of_skipping():
    model = nn.Sequential(nn.Linear(400, 900, bias=False))
    exact = analyze(model, max_evals=300, spectrum="exact", traps=False)
    assert [s.reason for s in exact.skipped] == ["M=400 > max_evals=300"]
    auto = analyze(model, max_evals=300, spectrum="auto", traps=False)
    assert not auto.skipped and len(auto.layers) == 1 and auto.layers[0].ok


def test_the_strict_rule_never_certifies_while_every_ritz_value_is_certified():
    """With every Ritz value certified no node carries the bulk: the scan would see only the
    top values and miss a lower x_min. A Pareto sample whose full scan takes about half the
    values: its top 100 alone, as if certified, pick a short tail; the rule must not hold."""
    from esdwatch.engine.tail import TopSpectrum, xmin_rule

    rng = np.random.default_rng(0)
    evals = np.sort((1.0 - rng.random(1000)) ** (-1.0 / 1.5))[::-1]  # Pareto, alpha 2.5, descending
    full = fit_power_law(evals)
    top = evals[:100]
    ts = TopSpectrum(
        values=top,
        bounds=np.zeros(100),
        ritz=top.copy(),
        weights=np.ones(100),
        trace=float(evals.sum()),
        M=1000,
        basis=100,
        matvecs=100,
        complete=False,
    )
    assert full.n_tail > 100  # the true x_min is below the "certified" part
    done, _ = xmin_rule(ts, fit_power_law(top))
    assert not done
    # the same top with uncertified nodes below it carrying the rest of the mass: judged as before
    ritz = np.concatenate([top, evals[100::50]])
    weights = np.concatenate([np.ones(100), np.full(ritz.size - 100, 900 / (ritz.size - 100))])
    with_bulk = dataclasses.replace(ts, ritz=ritz, weights=weights)
    done, fit = xmin_rule(with_bulk, fit_power_law(top))
    assert not done and fit.n_tail > 100  # the scan now sees the candidates below the certified part


def test_auto_falls_back_on_a_very_heavy_tailed_layer_whose_ritz_values_all_certify():
    """The 4096 x 4096 matrix that exposed it (i.i.d. Pareto entries, mu drawn in [1, 2]):
    every Ritz value certified at 448 vectors; "auto" must give the exact path's fit."""
    from esdwatch.engine import synthetic

    W = synthetic.heavy_tailed(4096, 4096, seed=0).float()
    exact = analyze_matrix(W, traps=False, spectrum="exact")
    auto = analyze_matrix(W, traps=False, spectrum="auto")
    assert (auto.n_tail, auto.xmin) == (exact.n_tail, pytest.approx(exact.xmin, rel=1e-6))
    assert auto.alpha == pytest.approx(exact.alpha, abs=1e-6)
