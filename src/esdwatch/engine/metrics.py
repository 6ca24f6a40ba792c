"""Per-layer HT-SR metrics computed from the eigenvalues of W^T W (docs/metrics.md section 4).

Every function takes the M meaningful eigenvalues lambda_i = nu_i^2 (unnormalized,
any order, exact zeros allowed) and returns plain floats. Nothing here knows about
torch modules or training loops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from esdwatch.engine.mp import fit_mp
from esdwatch.engine.powerlaw import fit_power_law

__all__ = [
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "numerical_rank",
    "matrix_entropy",
    "rank_collapse_fraction",
    "log_alpha_norm",
    "alpha_weighted",
    "layer_metrics",
    "DEFAULT_ZERO_TOL",
]

#: Relative tolerance below which an eigenvalue counts as "numerically zero" for rank
#: collapse: lambda_i < DEFAULT_ZERO_TOL * lambda_max, i.e. nu_i < 1e-3 nu_max. Loose
#: enough to catch collapse hidden under small noise, tight enough that a healthy square
#: Gaussian matrix (smallest singular values ~ nu_max / (2N)) puts well under 1% of its
#: eigenvalues there.
DEFAULT_ZERO_TOL = 1e-6

_NAN = float("nan")


def _as_array(evals: Any) -> np.ndarray:
    if hasattr(evals, "detach"):
        evals = evals.detach().cpu().numpy()
    return np.asarray(evals, dtype=np.float64).ravel()


def log_norm(evals: np.ndarray) -> float:
    """log10 of the squared Frobenius norm: log10 ||W||_F^2 = log10 sum_i lambda_i."""
    total = float(np.sum(evals))
    return math.log10(total) if total > 0 else _NAN


def log_spectral_norm(evals: np.ndarray) -> float:
    """log10 of the squared spectral norm: log10 ||W||_2^2 = log10 lambda_max."""
    lam_max = float(np.max(evals)) if evals.size else 0.0
    return math.log10(lam_max) if lam_max > 0 else _NAN


def stable_rank(evals: np.ndarray) -> float:
    """Stable rank ||W||_F^2 / ||W||_2^2 = sum_i lambda_i / lambda_max, in [1, M]."""
    lam_max = float(np.max(evals)) if evals.size else 0.0
    return float(np.sum(evals)) / lam_max if lam_max > 0 else _NAN


def numerical_rank(evals: np.ndarray, N: int, eps: float = float(np.finfo(np.float32).eps)) -> int:
    """Numerical rank with the ``numpy.linalg.matrix_rank`` tolerance.

    Counts singular values nu_i = sqrt(lambda_i) above nu_max * N * eps, N the larger
    dimension and eps the machine epsilon of the precision the weights are stored in
    (a float32 weight cannot resolve singular values below that).
    """
    if evals.size == 0:
        return 0
    sv = np.sqrt(np.clip(evals, 0.0, None))
    tol = float(sv.max()) * N * eps
    return int(np.count_nonzero(sv > tol))


def matrix_entropy(evals: np.ndarray, rank: int) -> float:
    """Normalized matrix (spectral) entropy of Martin & Mahoney (2021).

    S(W) = -(1 / ln R) sum_i p_i ln p_i with p_i = nu_i^2 / sum_j nu_j^2 and R the rank
    of W. In [0, 1]: 1 for a flat spectrum (e.g. an orthogonal W), 0 for rank one.
    """
    total = float(np.sum(evals))
    if total <= 0:
        return _NAN
    if rank <= 1:
        return 0.0
    p = evals[evals > 0] / total
    return float(-np.sum(p * np.log(p)) / math.log(rank))


def rank_collapse_fraction(evals: np.ndarray, zero_tol: float = DEFAULT_ZERO_TOL) -> float:
    """Share of the M eigenvalues with lambda_i < zero_tol * lambda_max.

    Only the M = min(N, M) eigenvalues of the small Gram matrix are passed in, so the
    structural zeros of a rectangular W never count as collapse.
    """
    if evals.size == 0:
        return _NAN
    lam_max = float(np.max(evals))
    if lam_max <= 0:
        return 1.0
    return float(np.count_nonzero(evals < zero_tol * lam_max)) / evals.size


def log_alpha_norm(evals: np.ndarray, alpha: float) -> float:
    """log10 of the Schatten alpha-norm, log10 sum_i lambda_i^alpha (computed in log space)."""
    positive = evals[evals > 0]
    if positive.size == 0 or not math.isfinite(alpha):
        return _NAN
    logs = alpha * np.log(positive)
    top = float(logs.max())
    return (top + math.log(float(np.sum(np.exp(logs - top))))) / math.log(10.0)


def alpha_weighted(alpha: float, evals: np.ndarray) -> float:
    """alpha-hat = alpha * log10(lambda_max) (Martin & Mahoney, Nat. Commun. 2021)."""
    return alpha * log_spectral_norm(evals)


def layer_metrics(
    evals: Any,
    N: int,
    M: int,
    *,
    num_slices: int = 1,
    weight_eps: float = float(np.finfo(np.float32).eps),
    xmin: float | None = None,
    xmax: float | None = None,
    fix_fingers: bool = False,
    mp_fit: bool = True,
    tw_margin: float | None = None,
    zero_tol: float = DEFAULT_ZERO_TOL,
    mp: Any = None,
) -> dict[str, Any]:
    """Every scalar metric of one layer, keyed by :class:`~esdwatch.schema.LayerReport` field.

    ``evals`` are the ``num_slices * M`` eigenvalues of the layer (pooled over conv
    slices). The power-law fit runs on the positive eigenvalues; the MP fit runs per
    layer on the pooled ESD with the slice shape (N, M), which for pooled conv slices is
    the same law (each slice shares N, M and, at initialization, sigma). ``mp``: a
    :func:`~esdwatch.engine.mp.fit_mp` result of these eigenvalues (same N, M, ``tw_margin``) to
    reuse instead of fitting again (the analyzer shares one fit with the phase classifier).
    """
    ev = np.sort(_as_array(evals))
    out: dict[str, Any] = {"num_evals": int(ev.size)}
    if ev.size == 0:
        return out
    lam_max = float(ev[-1])
    out["lambda_max"] = lam_max
    out["lambda_min"] = float(ev[0])
    out["log_norm"] = log_norm(ev)
    out["log_spectral_norm"] = log_spectral_norm(ev)
    out["stable_rank"] = stable_rank(ev)
    out["rank_collapse_fraction"] = rank_collapse_fraction(ev, zero_tol)
    # rank is a per-matrix notion; for pooled slices it is counted over all slices
    rank = numerical_rank(ev, max(N, M), weight_eps)
    out["numerical_rank"] = rank
    out["entropy"] = matrix_entropy(ev, rank)
    if lam_max <= 0:
        return out

    fit = fit_power_law(ev, xmin=xmin, xmax=xmax, fix_fingers=fix_fingers)
    out.update(
        alpha=fit.alpha,
        alpha_sigma=fit.sigma,
        xmin=fit.xmin,
        xmax=fit.xmax,
        D=fit.D,
        n_tail=int(fit.n_tail),
    )
    if math.isfinite(fit.alpha):
        out["alpha_weighted"] = alpha_weighted(fit.alpha, ev)
        out["log_alpha_norm"] = log_alpha_norm(ev, fit.alpha)

    if mp_fit:
        if mp is None:
            mp = fit_mp(ev, N, M) if tw_margin is None else fit_mp(ev, N, M, tw_margin=tw_margin)
        out.update(
            mp_sigma2=mp.sigma2,
            lambda_plus=mp.lambda_plus,
            lambda_minus=mp.lambda_minus,
            bulk_max=mp.bulk_max,
            tw_scale=mp.tw_scale,
            mp_ks=mp.ks,
            mp_softrank=mp.softrank,
            num_spikes=int(mp.num_spikes),
        )
    return out
