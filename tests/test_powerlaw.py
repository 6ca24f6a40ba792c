"""Tests of esdwatch.engine.powerlaw.fit_power_law against closed forms and the references.

References: powerlaw 2.0.0 ``Fit(x, parameter_ranges={'alpha': [1, 100]})`` and
weightwatcher 0.7.7 ``analyze()`` defaults on the CPU. Run this file as a script for a
timing comparison with powerlaw.Fit.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import esdwatch.engine.powerlaw as pl_module
from esdwatch.engine.powerlaw import PowerLawFit, fit_power_law

ALPHA_TOL = 1e-9
D_TOL = 1e-9


def reference_fit(x: np.ndarray, **kwargs: Any) -> Any:
    """powerlaw.Fit with the [1, 100] alpha range, its prints and warnings swallowed."""
    powerlaw = pytest.importorskip("powerlaw")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return powerlaw.Fit(x, parameter_ranges={"alpha": [1, 100]}, verbose=False, **kwargs)


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Single-threaded BLAS: these SVDs are small, and idle OpenBLAS workers spinning on a
    shared 2-core machine cost more than the threads gain."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def eigenvalues(W: np.ndarray) -> np.ndarray:
    with one_blas_thread():
        return np.linalg.svd(W, compute_uv=False) ** 2


def pareto_sample(rng: np.random.Generator, n: int, alpha: float, xmin: float = 1.0) -> np.ndarray:
    """Inverse-CDF sample of a continuous power law p(x) ~ x^-alpha on [xmin, inf)."""
    return xmin * rng.random(n) ** (-1.0 / (alpha - 1.0))


def _spectrum(name: str) -> np.ndarray:
    return _cached_spectrum(name).copy()


@functools.cache
def _cached_spectrum(name: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, name)))  # a fixed seed per case
    if name == "gauss_200x100":
        return eigenvalues(rng.standard_normal((200, 100)))
    if name == "gauss_500x250":
        return eigenvalues(rng.standard_normal((500, 250)))
    if name == "student_t3_300x150":
        return eigenvalues(rng.standard_t(3.0, (300, 150)))
    if name == "pareto_entries_200x120":
        return eigenvalues(rng.pareto(1.5, (200, 120)) * rng.choice([-1.0, 1.0], (200, 120)))
    if name == "pareto_alpha2.5_n400":
        return pareto_sample(rng, 400, 2.5, xmin=0.3)
    if name == "pareto_alpha4.5_n300":
        return pareto_sample(rng, 300, 4.5)
    if name == "lognormal_ties_n300":
        return np.round(rng.lognormal(0.0, 1.0, 300), 1)  # many tied values
    raise KeyError(name)


PARITY_CASES = [
    "gauss_200x100",
    "gauss_500x250",
    "student_t3_300x150",
    "pareto_entries_200x120",
    "pareto_alpha2.5_n400",
    "pareto_alpha4.5_n300",
    "lognormal_ties_n300",
]


# ----------------------------------------------------------------- 1. powerlaw parity


@pytest.mark.parametrize("name", PARITY_CASES)
def test_parity_with_powerlaw_scan(name: str) -> None:
    x = _spectrum(name)
    ref = reference_fit(x)
    fit = fit_power_law(x)

    assert fit.method == "ks" and fit.reason == ""
    assert fit.xmin == ref.xmin  # same data value, bit for bit
    assert abs(fit.alpha - ref.alpha) <= ALPHA_TOL
    assert abs(fit.D - ref.D) <= D_TOL
    assert fit.n_tail == int(ref.n)
    assert fit.sigma == pytest.approx((ref.alpha - 1.0) / math.sqrt(ref.n), rel=1e-12)
    assert fit.num_candidates == len(ref.xmin_fitting_results["xmins"])
    assert fit.xmax == np.max(x)


def test_candidate_set_excludes_two_largest_distinct_values() -> None:
    x = _spectrum("gauss_200x100")
    ref = reference_fit(x)
    distinct = np.unique(x)
    np.testing.assert_array_equal(ref.xmin_fitting_results["xmins"], distinct[:-2])
    assert fit_power_law(x).num_candidates == distinct.size - 2


def test_parity_with_powerlaw_xmax_as_data_filter() -> None:
    x = _spectrum("student_t3_300x150")
    cut = float(np.sort(x)[-6])  # drop the 5 largest eigenvalues
    ref = reference_fit(x[x <= cut])
    fit = fit_power_law(x, xmax=cut)
    assert fit.xmin == ref.xmin
    assert abs(fit.alpha - ref.alpha) <= ALPHA_TOL
    assert abs(fit.D - ref.D) <= D_TOL
    assert fit.xmax == cut


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_parity_with_powerlaw_fixed_xmin(quantile: float) -> None:
    x = _spectrum("gauss_500x250")
    xmin = float(np.quantile(x, quantile))  # not a data value: tests the E(u) offset
    ref = reference_fit(x, xmin=xmin).power_law
    fit = fit_power_law(x, xmin=xmin)
    assert fit.method == "fixed_xmin"
    assert abs(fit.alpha - ref.alpha) <= ALPHA_TOL
    assert abs(fit.D - ref.D) <= D_TOL
    assert fit.n_tail == ref.n


# ------------------------------------------------------------ 2. weightwatcher parity


@pytest.fixture(scope="module")
def weightwatcher_frame() -> tuple[Any, list[np.ndarray]]:
    with warnings.catch_warnings():
        # weightwatcher silences all warnings process-wide on import; keep that local.
        ww = pytest.importorskip("weightwatcher")
    torch.manual_seed(0)
    first = torch.nn.Linear(160, 320)  # default (uniform) init, weight 320 x 160
    second = torch.nn.Linear(320, 120)
    with torch.no_grad():  # heavy-tailed entries
        t = np.random.default_rng(5).standard_t(3.0, tuple(second.weight.shape))
        second.weight.copy_(torch.from_numpy(t))
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    sink = io.StringIO()
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(sink))
    quiet.enter_context(contextlib.redirect_stderr(sink))
    quiet.enter_context(warnings.catch_warnings())
    with quiet:
        warnings.simplefilter("ignore")
        with one_blas_thread():
            frame = ww.WeightWatcher(model=model).analyze()
    # weightwatcher casts the float32 weights to float64 before its SVD.
    weights = [m.weight.detach().numpy().astype(np.float64) for m in (first, second)]
    return frame, weights


@pytest.mark.parametrize("layer", [0, 1])
def test_parity_with_weightwatcher(weightwatcher_frame: tuple[Any, list[np.ndarray]], layer: int) -> None:
    import scipy.linalg

    frame, weights = weightwatcher_frame
    assert len(frame) == 2
    row = frame.iloc[layer]
    W = weights[layer]

    fit = fit_power_law(eigenvalues(W))
    assert fit.xmin == pytest.approx(row["xmin"], rel=1e-12)  # numpy vs scipy SVD: last bits
    assert abs(fit.alpha - row["alpha"]) <= 1e-6
    assert abs(fit.D - row["D"]) <= 1e-6
    assert fit.n_tail == row["num_pl_spikes"]

    # weightwatcher's own eigenvalues (scipy.linalg.svd) give the identical x_min.
    with one_blas_thread():
        same = fit_power_law(scipy.linalg.svd(W, compute_uv=False) ** 2)
    assert same.xmin == row["xmin"]
    assert abs(same.alpha - row["alpha"]) <= 1e-9


# ------------------------------------------------------------------ 3. closed forms


@pytest.mark.parametrize("alpha_true", [1.5, 2.5, 4.0])
def test_recovers_known_exponent(alpha_true: float) -> None:
    x = pareto_sample(np.random.default_rng(42), 20_000, alpha_true, xmin=2.0)
    fixed = fit_power_law(x, xmin=2.0)
    assert abs(fixed.alpha - alpha_true) < 0.1
    assert fixed.n_tail == 20_000
    scanned = fit_power_law(x)
    assert abs(scanned.alpha - alpha_true) < 0.15
    assert scanned.xmin >= 2.0 and scanned.D < 0.05


# ------------------------------------------------------------ 4. fixed xmin and xmax


def test_fixed_xmin_is_the_mle_formula() -> None:
    x = _spectrum("student_t3_300x150")
    xmin = float(np.median(x))
    tail = np.sort(x[x >= xmin])  # the sum runs over the sorted tail: same rounding
    fit = fit_power_law(x, xmin=xmin)
    expected = 1.0 + tail.size / np.sum(np.log(tail / xmin))
    assert fit.alpha == expected
    assert fit.n_tail == tail.size
    assert fit.sigma == (expected - 1.0) / math.sqrt(tail.size)
    assert fit.xmin == xmin and fit.num_candidates == 0

    # D by its definition: max over distinct tail values u of |F(u) - #{tail < u} / n|.
    u = np.unique(tail)
    below = np.array([(tail < v).sum() for v in u]) / tail.size
    by_definition = np.max(np.abs(1.0 - (u / xmin) ** (1.0 - expected) - below))
    assert fit.D == pytest.approx(by_definition, abs=1e-14)


def test_xmax_excludes_data_above_it() -> None:
    x = _spectrum("pareto_alpha2.5_n400")
    cut = float(np.quantile(x, 0.95))
    kept = np.sort(x[x <= cut])
    assert fit_power_law(x, xmax=cut) == fit_power_law(kept)

    xmin = float(np.quantile(x, 0.5))
    fixed = fit_power_law(x, xmin=xmin, xmax=cut)
    tail = kept[kept >= xmin]
    assert fixed.n_tail == tail.size
    assert fixed.alpha == 1.0 + tail.size / np.sum(np.log(tail / xmin))
    assert fixed.xmax == kept.max() <= cut


# ----------------------------------------------------- 5. chunking and large inputs


@pytest.mark.parametrize("n, tiny", [(600, 7), (5000, 257)])
def test_chunk_size_does_not_change_the_result(n: int, tiny: int) -> None:
    # n=600 takes the direct scan, n=5000 the bound-and-prune scan.
    rng = np.random.default_rng(n)
    x = eigenvalues(rng.standard_t(4.0, (2 * n, n))) if n <= 600 else np.abs(rng.standard_t(3.0, n))
    reference = fit_power_law(x)
    assert fit_power_law(x, max_chunk_elements=1000) == reference
    assert fit_power_law(x, max_chunk_elements=tiny) == reference


def test_pruned_scan_equals_exhaustive_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    spectra = [
        pareto_sample(rng, 4000, 2.2),
        np.abs(rng.standard_t(2.5, 4000)),
        np.round(rng.lognormal(0.0, 1.5, 4000), 2),
    ]
    pruned = [fit_power_law(x) for x in spectra]
    monkeypatch.setattr(pl_module, "_EXACT_SCAN_PAIRS", 1 << 62)
    exhaustive = [fit_power_law(x) for x in spectra]
    assert pruned == exhaustive


def test_large_spectrum_is_fast_and_memory_bounded() -> None:
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3.0, 50_000))
    tracemalloc.start()
    try:
        start = time.perf_counter()
        fit = fit_power_law(x)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fit.ok and 2.0 < fit.alpha < 6.0
    assert peak < 32 * 2**20  # about 10 MB; an n x n float64 array would be 20 GB
    assert elapsed < 10.0  # about 0.3 s unloaded


# ------------------------------------------------------- 6. degenerate and torch input


@pytest.mark.parametrize(
    "values, reason_word",
    [
        ([], "no positive"),
        (np.array([], dtype=np.float32), "no positive"),
        ([1.0], "1 distinct"),
        ([2.0, 2.0, 2.0, 2.0], "1 distinct"),
        ([1.0, 2.0], "2 distinct"),
        ([1.0, 2.0, 3.0], "3 distinct"),
        ([0.0, 0.0, 0.0], "no positive"),
        ([-1.0, -2.0, 0.0, math.nan, math.inf], "no positive"),
        (1000.0 + np.arange(10.0), "no candidate"),  # every alpha > 100
    ],
)
def test_degenerate_inputs_give_nan_without_noise(
    values: Any, reason_word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            fit = fit_power_law(values)
    assert isinstance(fit, PowerLawFit)
    assert math.isnan(fit.alpha) and math.isnan(fit.D) and math.isnan(fit.sigma)
    assert fit.n_tail == 0 and not fit.ok
    assert reason_word in fit.reason
    assert capsys.readouterr() == ("", "")


def test_non_positive_and_non_finite_values_are_dropped() -> None:
    x = _spectrum("gauss_200x100")
    dirty = np.concatenate([x, [0.0, 0.0, -3.0, math.nan, math.inf, -math.inf]])
    np.random.default_rng(0).shuffle(dirty)
    assert fit_power_law(dirty) == fit_power_law(x)


def test_four_distinct_values_is_the_smallest_fit() -> None:
    fit = fit_power_law([1.0, 2.0, 3.0, 4.0])
    assert fit.ok and fit.num_candidates == 2
    ref = reference_fit(np.array([1.0, 2.0, 3.0, 4.0]))
    assert fit.xmin == ref.xmin and abs(fit.alpha - ref.alpha) <= ALPHA_TOL


def test_torch_input_matches_numpy() -> None:
    x = _spectrum("gauss_500x250")
    expected = fit_power_law(x)
    assert fit_power_law(torch.from_numpy(x)) == expected
    assert fit_power_law(torch.from_numpy(x).requires_grad_()) == expected
    x32 = x.astype(np.float32)
    expected32 = fit_power_law(x32)
    assert fit_power_law(torch.from_numpy(x32)) == expected32
    assert fit_power_law(list(x32)) == expected32
    assert abs(expected32.alpha - expected.alpha) < 1e-3
    assert fit_power_law(torch.empty(0)).n_tail == 0


def test_input_order_does_not_matter() -> None:
    x = _spectrum("student_t3_300x150")
    assert fit_power_law(x[::-1]) == fit_power_law(np.random.default_rng(1).permutation(x))


def test_invalid_arguments_raise() -> None:
    x = _spectrum("gauss_200x100")
    with pytest.raises(ValueError):
        fit_power_law(np.ones((3, 3)))
    with pytest.raises(ValueError):
        fit_power_law(x, xmin=0.0)
    with pytest.raises(ValueError):
        fit_power_law(x, xmin=1.0, fix_fingers=True)
    with pytest.raises(ValueError):
        fit_power_law(x, max_chunk_elements=0)


def test_fix_fingers_places_xmin_at_the_esd_peak() -> None:
    x = eigenvalues(np.random.default_rng(8).standard_t(4.0, (600, 300)))
    fit = fit_power_law(x, fix_fingers=True)
    hist, edges = np.histogram(np.log10(x), bins=100)
    peak = 10.0 ** edges[np.argmax(hist)]
    assert fit.method == "fix_fingers" and fit.ok
    assert 0.95 * peak <= fit.xmin < 1.5 * peak
    # alpha and D are those of an ordinary fit at that x_min.
    fixed = fit_power_law(x, xmin=fit.xmin)
    assert (fit.alpha, fit.D, fit.n_tail) == (fixed.alpha, fixed.D, fixed.n_tail)


# ------------------------------------------------------------------------- timing


def _timing_report() -> None:  # pragma: no cover - run as a script
    rng = np.random.default_rng(0)
    print(f"{'M':>6} {'powerlaw.Fit [s]':>17} {'fit_power_law [s]':>18} {'speed-up':>9}  same xmin")
    for m in (1024, 4096):
        W = rng.standard_normal((2 * m, m))
        x = np.linalg.eigvalsh(W.T @ W)  # = singular values squared, much faster than svd
        start = time.perf_counter()
        ref = reference_fit(x)
        t_ref = time.perf_counter() - start
        t_ours = min(_timed(x) for _ in range(5))
        ours = fit_power_law(x)
        same = ours.xmin == ref.xmin and abs(ours.alpha - ref.alpha) <= ALPHA_TOL
        print(f"{m:>6} {t_ref:>17.2f} {t_ours:>18.4f} {t_ref / t_ours:>8.0f}x  {same}")


def _timed(x: np.ndarray) -> float:  # pragma: no cover
    start = time.perf_counter()
    fit_power_law(x)
    return time.perf_counter() - start


if __name__ == "__main__":  # pragma: no cover
    _timing_report()
