"""Correlation traps: randomization, trap count, rand_distance, offending entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esdwatch.engine import synthetic
from esdwatch.engine.spectrum import batch_eigenvalues
from esdwatch.engine.traps import (
    TrapEntry,
    correlation_traps,
    esd_distance,
    largest_entries,
    randomize_matrix,
    trap_fields,
    trap_fields_from_evals,
)

N, M = 400, 200


def gaussian(seed: int = 0, n: int = N, m: int = M) -> torch.Tensor:
    return torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def with_large_entries(W: torch.Tensor, where, size: float = 60.0) -> torch.Tensor:
    W = W.clone()
    for i, (r, c) in enumerate(where):
        W[r, c] = size * (1 + 0.1 * i) * (-1) ** i
    return W


INJECTED = [(3, 5), (100, 17), (250, 150)]


# ----------------------------------------------------------------------- randomization


def test_randomize_matrix_permutes_entries():
    W = gaussian(1)
    R = randomize_matrix(W, seed=3, center=False)
    assert R.shape == W.shape and R.dtype == W.dtype and R.device == W.device
    assert torch.equal(torch.sort(R.reshape(-1)).values, torch.sort(W.reshape(-1)).values)
    assert not torch.equal(R, W)
    assert torch.equal(R, randomize_matrix(W, seed=3, center=False))
    assert not torch.equal(R, randomize_matrix(W, seed=4, center=False))
    # the default centers the permuted entries on their mean
    C = randomize_matrix(W + 5.0, seed=3)
    assert torch.allclose(C, R - W.mean())
    assert abs(float(C.mean())) < 1e-12


def test_randomize_stack_keeps_each_slice_entries():
    W = torch.randn(3, 30, 20, generator=torch.Generator().manual_seed(0))
    R = randomize_matrix(W, seed=1, center=False)
    for s in range(3):
        assert torch.equal(torch.sort(R[s].reshape(-1)).values, torch.sort(W[s].reshape(-1)).values)
    C = randomize_matrix(W + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1), seed=1)
    assert torch.allclose(C.mean(dim=(1, 2)), torch.zeros(3), atol=1e-6)  # each slice on its own mean
    with pytest.raises(ValueError):
        randomize_matrix(torch.ones(5), 0)


def test_a_mean_offset_is_not_a_trap():
    # trained layers often have a nonzero mean entry; the permutation keeps it, and mu 1 1^T
    # is a rank-one outlier of the plain randomization that has nothing to do with large entries
    W = gaussian(8) + 0.2  # |mu| sqrt(M) / sigma = 2.8 > (M / N)^(1/4): above the BBP threshold
    R = randomize_matrix(W, seed=0, center=False)
    ev_plain = batch_eigenvalues([R])[0]
    from esdwatch.engine.mp import fit_mp

    fit = fit_mp(ev_plain.numpy(), N, M)
    assert (ev_plain.numpy() > fit.lambda_plus + 4 * fit.tw_scale).sum() == 1  # the mean's outlier
    res = correlation_traps(W)
    assert res.num_traps == 0
    assert correlation_traps(with_large_entries(W, INJECTED)).num_traps == 3


# ------------------------------------------------------------------------- the trap test


def test_gaussian_has_no_traps():
    res = correlation_traps(gaussian(2))
    assert res.num_traps == 0 and not res.has_traps
    assert res.entries == ()
    assert res.rand_lambda_max <= res.rand_lambda_plus + 4 * res.rand_tw_scale
    assert res.rand_distance < 0.2  # only the sampling floor


def test_injected_large_entries_are_traps_and_located():
    W = with_large_entries(gaussian(2), INJECTED)
    res = correlation_traps(W, seed=0)
    assert res.num_traps == len(INJECTED)
    assert res.rand_lambda_max > 5 * res.rand_lambda_plus
    assert {(e.row, e.col) for e in res.entries} == set(INJECTED)
    assert all(abs(e.zscore) > 20 for e in res.entries)
    assert "(3,5)=" in res.entries_str()
    # a transposed input reports positions in its own layout
    res_t = correlation_traps(W.T, seed=0)
    assert {(e.row, e.col) for e in res_t.entries} == {(c, r) for r, c in INJECTED}


def test_traps_do_not_depend_on_the_seed_much():
    W = with_large_entries(gaussian(5), INJECTED)
    counts = [correlation_traps(W, seed=s).num_traps for s in range(3)]
    # two large entries that the permutation puts in one row or column make one
    # eigenvalue (seed 2 here), so the count can be lower than the number of entries
    assert counts == [3, 3, 2]


def test_low_rank_signal_is_not_a_trap():
    # real correlation: spikes in the ESD of W, destroyed by the randomization
    W = synthetic.bulk_plus_spikes(N, M, seed=1, rank=3, rel=5.0)
    res = correlation_traps(W)
    assert res.num_traps == 0
    # W itself has spikes (the randomized edge is higher than W's bulk edge: the
    # permutation spreads the signal's energy over all entries)
    assert res.lambda_max > 4 * res.rand_lambda_plus
    noise = correlation_traps(gaussian(3))
    assert res.rand_distance > noise.rand_distance  # W carries correlation, noise does not


def test_rand_distance_of_strong_structure():
    low_rank = synthetic.rank_collapse(N, M, seed=1, mode="low_rank", rank=10)
    assert correlation_traps(low_rank).rand_distance > 0.8


def test_top_k_and_bad_input():
    W = with_large_entries(gaussian(2), INJECTED)
    assert len(correlation_traps(W, top_k=2).entries) == 2
    bad = gaussian(2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        correlation_traps(bad)
    with pytest.raises(ValueError):
        correlation_traps(torch.ones(5))


# ------------------------------------------------------------------------------ pieces


def test_esd_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.uniform(1, 2, 500)
    b = rng.uniform(10, 20, 500)
    assert esd_distance(a, a) == 0.0
    assert esd_distance(a, b) == pytest.approx(1.0)
    c = rng.uniform(1, 3, 500)
    assert esd_distance(a, c) == pytest.approx(esd_distance(c, a))
    assert 0 < esd_distance(a, c) < 1
    # scale-free (log bins)
    assert esd_distance(a, c) == pytest.approx(esd_distance(1e5 * a, 1e5 * c))
    # zeros count as mass at the bottom
    assert esd_distance(np.r_[a, np.zeros(500)], a) > 0.3
    assert math.isnan(esd_distance([], a))


def test_largest_entries():
    W = torch.zeros(4, 5)
    W[1, 2], W[3, 0] = -7.0, 5.0
    e = largest_entries(W, 2)
    assert e[0] == TrapEntry(1, 2, -7.0, e[0].zscore, 0) and (e[1].row, e[1].col) == (3, 0)
    assert (largest_entries(W, 1, transpose=True)[0].row, largest_entries(W, 1, transpose=True)[0].col) == (2, 1)
    S = torch.zeros(2, 3, 3)
    S[1, 0, 2] = 9.0
    assert largest_entries(S, 1)[0].slice == 1
    assert largest_entries(W, 0) == ()


def test_trap_fields_from_evals_matches_correlation_traps():
    W = with_large_entries(gaussian(4), INJECTED)
    R = randomize_matrix(W, seed=0)
    ev, rev = batch_eigenvalues([W, R])
    fields = trap_fields_from_evals(W, ev, rev, N, M)
    res = correlation_traps(W, seed=0)
    assert fields["num_traps"] == res.num_traps == 3
    assert fields["rand_distance"] == pytest.approx(res.rand_distance)
    assert fields["rand_lambda_max"] == pytest.approx(res.rand_lambda_max)
    assert fields["rand_lambda_plus"] == pytest.approx(res.rand_lambda_plus)
    assert fields["trap_entries"] == res.entries_str()
    # W=None: no entries, same numbers; non-finite evals: no result
    assert trap_fields_from_evals(None, ev, rev, N, M)["trap_entries"] == ""
    bad = rev.clone()
    bad[0] = float("nan")
    assert trap_fields_from_evals(W, ev, bad, N, M)["num_traps"] == -1


def test_trap_fields_for_a_layer_matrix_in_stored_coordinates():
    from esdwatch.engine.analyzer import AnalysisConfig
    from esdwatch.engine.layers import LayerMatrix
    from esdwatch.schema import LayerReport

    stored = with_large_entries(gaussian(6), INJECTED).T.contiguous()  # a (out=200, in=400) parameter
    mat = LayerMatrix(
        name="fc", kind="linear", module_type="Linear", weight=stored.T.unsqueeze(0), source_shape=tuple(stored.shape)
    )
    rep = LayerReport(name="fc", kind="linear", N=N, M=M, Q=N / M)
    fields = trap_fields(mat, rep, AnalysisConfig())
    assert fields["num_traps"] == 3
    for r, c in INJECTED:  # positions refer to the stored (200 x 400) parameter
        assert f"({c},{r})=" in fields["trap_entries"]


def test_analyze_matrix_runs_traps_by_default():
    from esdwatch.engine.analyzer import analyze_matrix

    rep = analyze_matrix(with_large_entries(gaussian(7), INJECTED))
    assert rep.num_traps == 3 and rep.trap_entries
    assert rep.rand_lambda_max > rep.rand_lambda_plus > 0 and 0 <= rep.rand_distance <= 1
    clean = analyze_matrix(gaussian(7))
    assert clean.num_traps == 0 and clean.trap_entries == ""
    off = analyze_matrix(gaussian(7), traps=False)
    assert off.num_traps == -1 and math.isnan(off.rand_distance)


def test_largest_entries_of_a_transposed_view_name_the_same_positions():
    gen = torch.Generator().manual_seed(11)
    stored = torch.randn(40, 90, generator=gen)
    stored[3, 70], stored[25, 5] = 40.0, -35.0  # far from the mean on both sides
    view = stored.t()  # the oriented (N >= M) view the analyzer passes
    assert not view.is_contiguous()
    from_view = largest_entries(view, 2)
    from_copy = largest_entries(view.contiguous(), 2)
    assert [(e.row, e.col, e.value) for e in from_view] == [(e.row, e.col, e.value) for e in from_copy]
    assert [(e.row, e.col) for e in from_view] == [(70, 3), (5, 25)]
    assert from_view[0].zscore > 10 and from_view[1].zscore < -10


def test_largest_entries_match_a_full_sort():
    # the row-extremes shortcut finds the same entries as ranking every entry by |w - mean|
    g = torch.Generator().manual_seed(3)
    for W in (
        torch.randn(300, 200, generator=g),
        torch.randn(200, 300, generator=g).T,  # an oriented view
        torch.randn(4, 30, 50, generator=g),  # a stack of slices
        torch.randn(1, 500, generator=g),
        torch.randn(500, 1, generator=g),
    ):
        values = W.reshape(-1).double()
        ranked = torch.argsort((values - values.mean()).abs(), descending=True)
        for k in (1, 5, 20):
            got = sorted(abs(e.value - float(values.mean())) for e in largest_entries(W, k))
            want = sorted(float((values[i] - values.mean()).abs()) for i in ranked[:k])
            assert got == pytest.approx(want, rel=1e-12)
