"""Which law describes a layer's ESD tail best, the truncated power law, and alpha's bootstrap interval.

The published tables esdwatch reproduces (Martin & Mahoney's pretrained-model tables) give,
next to alpha, a "Best Fit" column: PL or TPL. This module decides it on the tail
``lambda >= x_min`` that the power-law fit (:mod:`esdwatch.engine.powerlaw`) chose.

Tail laws (all continuous, normalized on [x_min, inf); Clauset, Shalizi & Newman 2009, table 2.1)
-------------------------------------------------------------------------------------------------
* PL, power law: ``p(x) ~ x^-alpha`` (esdwatch's own fit; alpha in [1, 100]).
* TPL, truncated power law: ``p(x) ~ x^-alpha exp(-Lambda x)``, alpha in [1, 100], Lambda >= 0.
* lognormal: ``p(x) ~ exp(-(ln x - mu)^2 / (2 sigma^2)) / x``.
* exponential: ``p(x) ~ exp(-Lambda x)``.

The alternatives are fitted by maximum likelihood with the reference implementation,
``powerlaw`` (Alstott, Bullmore & Plenz 2014), imported lazily: the ``fits`` extra
(``pip install esdwatch[fits]``) installs it. The call is exactly
``powerlaw.Fit(tail_data, xmin=x_min, parameter_ranges={'alpha': [1, 100]})`` and
``Fit.distribution_compare('power_law', law, normalized_ratio=True)``, so every number equals
the reference's on the same tail (tests/test_tail_laws.py).

Comparison (CSN section 5; Vuong 1989)
--------------------------------------
For each alternative, the log-likelihood ratio ``R = sum_i (ln p_PL(x_i) - ln p_alt(x_i))``
over the n tail points, normalized by ``sqrt(n) sd(ln p_PL - ln p_alt)``: > 0 favours the
power law, < 0 the alternative. Its p-value is ``erfc(|R| / sqrt 2)`` (Vuong's test,
non-nested laws), and for the nested pair PL within TPL the likelihood-ratio test
``P(chi^2_1 > 2 |R_raw|)``.

best_fit: PL unless an alternative beats it with ``R < 0`` and ``p < p_threshold`` (0.1, as
in CSN). Among those that do, the simpler law is kept unless a richer one is significantly
better: the exponential (one parameter) unless TPL or lognormal beats it in their own
comparison (R > 0, p < 0.1). Once a two-parameter law is in, TPL and lognormal (two
parameters each) are decided by the sign of their own comparison, whichever of them beat
PL significantly (see :func:`best_law` for why).

E_TPL
-----
weightwatcher 0.7.7 (``analyze(fit="E_TPL")``) defines the "extended" TPL as its TPL fit
with ``fix_fingers="xmin_peak"``: x_min is searched only near the peak of the log-ESD
(histogram of log10 eigenvalues, 100 bins, below 1.5 times the left edge of the fullest
bin) and a truncated power law is fitted above it. esdwatch's ``fit="E_TPL"`` is its TPL
fit above the x_min of its ``fix_fingers=True`` power-law scan, i.e. the same peak window.
Where the two differ: weightwatcher selects x_min by the KS distance of *truncated* power
law fits at every candidate (``xmin_distribution="truncated_power_law"``, one numerical
fit per candidate), with the window's lower bound passed as ``log10(0.95 peak)`` (in
log units, so in effect no lower bound); esdwatch selects x_min by the power law's KS
distance (the x_min reported with alpha) within [0.95 peak, 1.5 peak) and fits the TPL
once above it. Given the same x_min the TPL alpha and Lambda are the same numbers
(measured against weightwatcher 0.7.7 run with powerlaw 1.5: to 1e-10; with powerlaw 2 its
TPL fits fail and return alpha = Lambda = -1).

Bootstrap interval of alpha
---------------------------
``alpha_sigma = (alpha - 1) / sqrt(n_tail)`` (CSN eq. 3.2) treats x_min as known. The
bootstrap (CSN section 3.4) resamples the eigenvalues with replacement and repeats the
whole fit, x_min scan included, for every resample at once (:func:`bootstrap_alpha`),
with the copies of an eigenvalue that a resample repeats kept apart as separate points.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from esdwatch.engine.powerlaw import ALPHA_RANGE, fit_power_law

__all__ = [
    "FIT_TYPES",
    "FitType",
    "check_fit",
    "tail_law_fields",
    "TAIL_LAWS",
    "TailLaws",
    "compare_tail_laws",
    "AlphaInterval",
    "bootstrap_alpha",
]

NAN = float("nan")
log = logging.getLogger(__name__)

#: Values of the ``fit`` option: the power law only (default), plus the truncated power
#: law and the best-fit comparison above the scanned x_min (TPL), or above the x_min of
#: the ESD-peak window (E_TPL, weightwatcher's extended TPL).
FIT_TYPES: tuple[str, ...] = ("PL", "TPL", "E_TPL")
FitType = Literal["PL", "TPL", "E_TPL"]

#: Names of the tail laws, as ``best_fit`` reports them, and the matching ``powerlaw`` names.
TAIL_LAWS: dict[str, str] = {
    "PL": "power_law",
    "TPL": "truncated_power_law",
    "lognormal": "lognormal",
    "exponential": "exponential",
}

#: Significance level of the likelihood-ratio tests (CSN section 5 use 0.1).
DEFAULT_P_THRESHOLD = 0.1

_MISSING_POWERLAW = 'fit="{fit}" needs the powerlaw package: pip install "esdwatch[fits]"'

# fewer tail points than this and no comparison is meaningful
_MIN_TAIL = 5

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class TailLaws:
    """The truncated power law and the comparison of PL with each alternative on one tail.

    Attributes:
        tpl_alpha, tpl_lambda: TPL exponent and cut-off rate Lambda (1 / eigenvalue units).
        R, p: per alternative ("TPL", "lognormal", "exponential"), the normalized
            log-likelihood ratio PL vs it (> 0 favours PL) and its p-value.
        best_fit: "PL", "TPL", "lognormal" or "exponential"; "" when not compared.
        reason: empty, or why nothing was compared.
    """

    tpl_alpha: float = NAN
    tpl_lambda: float = NAN
    R: dict[str, float] | None = None
    p: dict[str, float] | None = None
    best_fit: str = ""
    reason: str = ""

    def report_fields(self) -> dict[str, Any]:
        """The :class:`~esdwatch.schema.LayerReport` fields of this comparison."""
        R, p = self.R or {}, self.p or {}
        return {
            "tpl_alpha": self.tpl_alpha,
            "tpl_lambda": self.tpl_lambda,
            "best_fit": self.best_fit,
            "fit_R_tpl": R.get("TPL", NAN),
            "fit_p_tpl": p.get("TPL", NAN),
            "fit_R_lognormal": R.get("lognormal", NAN),
            "fit_p_lognormal": p.get("lognormal", NAN),
            "fit_R_exponential": R.get("exponential", NAN),
            "fit_p_exponential": p.get("exponential", NAN),
        }


def check_fit(fit: Any) -> None:
    """Raise ValueError unless ``fit`` is one of :data:`FIT_TYPES`, ImportError if it needs a missing ``powerlaw``.

    Checked when the options are made, so a missing extra is an error before any layer
    is analysed rather than a failed report per layer.
    """
    if fit not in FIT_TYPES:
        raise ValueError(f"fit must be one of {', '.join(map(repr, FIT_TYPES))}, got {fit!r}")
    if fit != "PL" and importlib.util.find_spec("powerlaw") is None:
        raise ImportError(_MISSING_POWERLAW.format(fit=fit))


def tail_law_fields(
    evals: Any,
    pl_xmin: float,
    *,
    fit: str = "PL",
    alpha_ci: bool = False,
    xmin: float | None = None,
    xmax: float | None = None,
    fix_fingers: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The LayerReport fields of the tail-law comparison (fit != "PL") and of the bootstrap (alpha_ci).

    ``pl_xmin`` is the power-law fit's x_min (the tail compared); ``xmin``, ``xmax`` and
    ``fix_fingers`` are the options that fit was made with, repeated on every resample.
    """
    out: dict[str, Any] = {}
    if fit != "PL":
        try:
            out.update(compare_tail_laws(evals, pl_xmin, xmax=xmax).report_fields())
        except ImportError:
            raise
        except Exception as exc:  # a numerical failure of an alternative must not lose the layer's report
            log.warning("esdwatch: tail-law comparison failed (%s: %s); best_fit left empty", type(exc).__name__, exc)
    if alpha_ci:
        interval = bootstrap_alpha(evals, seed=seed, xmin=xmin, xmax=xmax, fix_fingers=fix_fingers)
        out.update(alpha_ci_low=interval.low, alpha_ci_high=interval.high)
    return out


def _import_powerlaw() -> Any:
    try:
        import powerlaw
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(_MISSING_POWERLAW.format(fit="TPL")) from exc
    return powerlaw


def compare_tail_laws(
    evals: Any, xmin: float, *, xmax: float | None = None, p_threshold: float = DEFAULT_P_THRESHOLD
) -> TailLaws:
    """Fit TPL, lognormal and exponential to the tail ``evals >= xmin`` and pick the best law.

    Args:
        evals: eigenvalues (any order); non-finite and non-positive values are dropped,
            and values above ``xmax`` when it is given (as for the power-law fit).
        xmin: the tail's lower end, normally the power-law fit's x_min.
        p_threshold: significance level of the comparisons.

    Returns:
        :class:`TailLaws`; with fewer than 5 tail points or no finite x_min, nothing is
        fitted (``reason`` says why). Never raises on data.

    Raises:
        ImportError: when ``powerlaw`` is not installed (the ``fits`` extra).
    """
    powerlaw = _import_powerlaw()
    x = np.asarray(evals, dtype=np.float64).ravel()
    keep = np.isfinite(x) & (x > 0)
    if xmax is not None:
        keep &= x <= float(xmax)
    x = x[keep]
    if not (math.isfinite(xmin) and xmin > 0):
        return TailLaws(reason="no power-law x_min")
    n_tail = int((x >= xmin).sum())
    if n_tail < _MIN_TAIL:
        return TailLaws(reason=f"{n_tail} tail point(s) (< {_MIN_TAIL})")
    # powerlaw prints and warns about fits near a parameter bound (e.g. Lambda -> 0 for a
    # pure power law): an expected outcome here, not something to show the user
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(x, xmin=float(xmin), parameter_ranges={"alpha": list(ALPHA_RANGE)}, verbose=False)
        tpl = fit.truncated_power_law
        compare = powerlaw_compare(fit)
        R: dict[str, float] = {}
        p: dict[str, float] = {}
        for law in ("TPL", "lognormal", "exponential"):
            R[law], p[law] = compare("PL", law)
        best = best_law(R, p, compare, p_threshold)
    return TailLaws(tpl_alpha=float(tpl.alpha), tpl_lambda=float(tpl.Lambda), R=R, p=p, best_fit=best)


def powerlaw_compare(fit: Any) -> Callable[[str, str], tuple[float, float]]:
    """``compare(a, b)``: powerlaw's normalized log-likelihood ratio of laws a vs b on ``fit``'s tail, and its p."""

    def compare(a: str, b: str) -> tuple[float, float]:
        R, p = fit.distribution_compare(TAIL_LAWS[a], TAIL_LAWS[b], normalized_ratio=True)
        return float(R), float(p)

    return compare


def best_law(
    R: dict[str, float],
    p: dict[str, float],
    compare: Callable[[str, str], tuple[float, float]],
    p_threshold: float = DEFAULT_P_THRESHOLD,
) -> str:
    """The best tail law from the PL comparisons ``R``/``p`` and a pairwise ``compare(a, b) -> (R, p)``.

    PL unless an alternative beats it (R < 0, p < p_threshold). Of those that do, the
    exponential (one parameter) unless a two-parameter law beats *it* significantly. Then
    TPL or lognormal by the sign of their comparison (the larger likelihood; they have as
    many parameters), even when only one of them beat PL significantly: PL is nested in
    TPL, so that test (likelihood ratio, chi^2_1) is far more powerful than Vuong's test of
    PL against the non-nested lognormal, and a lognormal that out-fits a TPL which beat PL
    out-fits PL as well. Requiring the lognormal's own significant win over PL labelled
    lognormal tails (mu 0, sigma 1.5, n_tail = 200) TPL where that test missed and the
    TPL's did not; without it best_fit labels them as often as their fitted likelihoods
    allow (experiments/results/fit_families.md, the TPL-vs-lognormal table).
    """
    better = [law for law in ("TPL", "lognormal", "exponential") if R[law] < 0 and p[law] < p_threshold]
    if not better:
        return "PL"
    if "exponential" in better:
        richer = [law for law in better if law != "exponential" and _beats(compare(law, "exponential"), p_threshold)]
        if not richer:
            return "exponential"
    return "TPL" if compare("TPL", "lognormal")[0] >= 0 else "lognormal"


def _beats(comparison: tuple[float, float], p_threshold: float) -> bool:
    R, p = comparison
    return R > 0 and p < p_threshold


# ----------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class AlphaInterval:
    """Bootstrap distribution of the power-law alpha (x_min re-scanned per resample).

    Attributes:
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the alphas.
        sd: their standard deviation (comparable with ``alpha_sigma``).
        alphas: the alpha of every resample that had a fit.
    """

    low: float
    high: float
    sd: float
    alphas: FloatArray


def bootstrap_alpha(
    evals: Any,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    break_ties: bool = True,
    **fit_options: Any,
) -> AlphaInterval:
    """Bootstrap interval of alpha: the CSN power-law fit repeated on ``n_boot`` resamples.

    Every resample (n values drawn with replacement from the n positive finite
    eigenvalues, all drawn in one call) gets the full fit of
    :func:`esdwatch.engine.powerlaw.fit_power_law` (with ``fit_options``: xmin, xmax,
    fix_fingers), x_min scan by KS distance included, so
    the interval carries the uncertainty of x_min that ``alpha_sigma`` leaves out.

    Ties: a resample repeats about a third of the eigenvalues two or more times, but the fit
    is that of continuous data, where the scan's candidates are distinct values and a value
    drawn k times is one candidate whose tail starts with k points at once (a jump of k /
    n_tail in the empirical CDF at x_min). Those jumps push the KS scan to other, often
    smaller tails, which fresh draws of the law never produce: with n = 100 such a
    bootstrap's median sd is 1.23 times the true spread of alpha over draws. With
    ``break_ties`` (the default) the j-th extra copy of an eigenvalue in a resample is moved
    up by the relative amount ``j * 1e-9``, so each copy is a point of its own (the
    convention weightwatcher's scan applies to tied values): alpha moves by about 1e-9, only
    the candidates change, and the result is the same for any spacing from 1e-12 to 1e-6
    (checked at n = 100: it is the order that matters, not the amount). Ties already present
    in ``evals`` stay ties. The median bootstrap sd is then 1.05, 0.95 and 1.02 times the
    spread at n = 100, 500 and 2000 (experiments/results/fit_families.md, "Uncertainty of
    alpha"), at 1.1-1.6x the time of the tied resamples (more distinct candidates to scan).
    ``break_ties=False`` is the textbook resampling, kept for that comparison.

    Each fit is the vectorized, pruned scan (a few ms for n = 400).

    Returns:
        :class:`AlphaInterval`; nan bounds when fewer than 2 resamples had a fit.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(evals, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < 4:
        return AlphaInterval(NAN, NAN, NAN, np.empty(0))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(n_boot, x.size))
    samples = _separate_copies(x, index) if break_ties else x[index]
    alphas = np.array([fit_power_law(row, **fit_options).alpha for row in samples])
    alphas = alphas[np.isfinite(alphas)]
    if alphas.size < 2:
        return AlphaInterval(NAN, NAN, NAN, alphas)
    lo, hi = np.quantile(alphas, [(1 - level) / 2, (1 + level) / 2])
    return AlphaInterval(float(lo), float(hi), float(alphas.std(ddof=1)), alphas)


# relative spacing of the copies of one eigenvalue in a resample (see bootstrap_alpha)
_COPY_SPACING = 1e-9


def _separate_copies(x: FloatArray, index: NDArray[np.int64]) -> FloatArray:
    """``x[index]`` with the j-th repeat of an index in a row scaled by ``1 + j * 1e-9`` (j = 0 for the first)."""
    index = np.sort(index, axis=1)
    cols = np.arange(index.shape[1])
    first = np.ones(index.shape, dtype=bool)
    first[:, 1:] = index[:, 1:] != index[:, :-1]
    # position of the first copy of each run, carried along the run
    run_start = np.maximum.accumulate(np.where(first, cols, 0), axis=1)
    return x[index] * (1.0 + _COPY_SPACING * (cols - run_start))
