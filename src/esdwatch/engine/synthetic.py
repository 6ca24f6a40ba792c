"""Seeded synthetic weight matrices of a known phase of training (docs/metrics.md section 5).

Ground truth for :mod:`esdwatch.engine.phases`. Every generator returns an ``N x M`` float64
torch tensor (any orientation is accepted: N < M gives the transpose of the N >= M
matrix), is fully determined by ``seed`` (a numpy ``Generator`` draws everything, so
results are identical on every platform), and takes an overall ``sigma`` that scales
the matrix (phases are scale-free, so ``sigma`` never changes the phase).

Notation: c = M / N = 1 / Q <= 1 (oriented so N >= M). Noise is ``Z = G / sqrt(N)``
with G standard Gaussian, whose Gram matrix ``Z^T Z`` follows Marchenko-Pastur on
``[(1 - sqrt c)^2, (1 + sqrt c)^2]``. Signals are rank-one terms ``theta u v^T`` with
unit vectors u (in R^N) and v (in R^M). By the BBP transition for rectangular
information-plus-noise matrices (Benaych-Georges & Nadakuditi 2012) such a term
produces an outlier singular value of ``Z + theta u v^T`` only if
``theta > theta_c = c^(1/4)`` (docs/metrics.md: |Delta| > sigma Q^(-1/4)), at::

    s^2(theta) = (1 + theta^2)(c + theta^2) / theta^2     (> (1 + sqrt c)^2 = edge)

The returned matrix is ``sigma * sqrt(N) * (Z + signal)``, so the noise part has
i.i.d. N(0, sigma^2) entries and unnormalized eigenvalues ``lambda = N sigma^2 s^2``
(lambda_plus = N sigma^2 (1 + 1/sqrt Q)^2). Instead of theta the spiked generators take
the outlier position directly, as its relative distance above the MP edge,
``rel = lambda_out / lambda_plus - 1`` (inverted with :func:`theta_for_rel`), because
that is what the classifier sees and it does not depend on N.

Generators and the parameter ranges in which their phase is unambiguous (the defaults
draw from these ranges, which is what :func:`make_phase_matrix` and the benchmark use;
all need M >= 50, the size floor of the classifier):

=============  ===================================================  ============================================
phase          construction                                         unambiguous range (the defaults)
=============  ===================================================  ============================================
Random-like    i.i.d. entries: Gaussian, uniform or Rademacher      always (MP holds for any i.i.d. entries with
               (MP universality)                                    a finite 4th moment)
Bleeding-out   noise + 1-3 rank-one signals just past the BBP       outliers at rel in [12 s_TW / lambda_plus,
               threshold                                            0.2]: at least 12 Tracy-Widom scales above
                                                                    the edge (near the threshold finite-size
                                                                    outliers scatter by several TW scales) and
                                                                    at most 20% above it (not yet a separated
                                                                    spike). The window is empty, and the
                                                                    generator raises, for small M: roughly
                                                                    M < 235 for Q = 1, M < 75 for Q = 8
                                                                    (:func:`bleeding_window`).
Bulk+Spikes    noise + 1..max(1, min(5, M // 40)) rank-one signals  rel in [1, 10], log-uniform (outliers at 2
               well past the threshold                              to 11 lambda_plus)
Bulk-decay     noise + many rank-one signals of power-law           top outlier at rel in [2, 6]; max(16,
               decaying strength: a decaying continuum of           0.04-0.08 M) outliers down to rel = 0.03;
               eigenmass through the edge, sub-threshold            measured: 3-10% of the eigenvalues and <= 30%
               components smearing the edge (:func:`bulk_decay`)    of ||W||_F^2 above the edge, alpha > 3.3
Heavy-Tailed   i.i.d. symmetric Pareto entries, P(|x| > t) =        mu in [1, 2]. For 2 < mu < 4 the ESD has no
               t^-mu for t >= 1 (docs/metrics.md section 3)                 MP edge only as N -> oo: at N <= 2048 it
                                                                    keeps an MP-like bulk with a few outliers
                                                                    (Bulk-decay at mu = 2.5, Bleeding-out or
                                                                    Random-like from mu = 3; finite-size
                                                                    effects, see the benchmark's sweeps)
Rank-collapse  inner rank r in [1, M / 2] (``A B / sqrt r``) plus   >= 25% of the eigenvalues numerically zero
               noise 1e-6 relative, or 50-90% dead (all-zero)       (the defaults give >= 50%), noise <= 1e-4
               input units of a Gaussian matrix                     relative to the signal's entries
=============  ===================================================  ============================================

Beyond the phase table, :func:`power_law_spikes` gives a trained-like ESD whose fitted
power-law tail has a known, short length (an MP bulk plus power-law-distributed outliers):
the ground truth of the tail path (:mod:`esdwatch.engine.tail`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from esdwatch.engine.mp import tracy_widom_scale
from esdwatch.schema import Phase

__all__ = [
    "random_like",
    "bleeding_out",
    "bulk_plus_spikes",
    "bulk_decay",
    "heavy_tailed",
    "power_law_spikes",
    "rank_collapse",
    "make_phase_matrix",
    "GENERATORS",
    "theta_for_rel",
    "outlier_rel",
    "bleeding_window",
    "bbp_threshold",
]


# ----------------------------------------------------------------------------- helpers


def _oriented_shape(N: int, M: int) -> tuple[int, int, bool]:
    N, M = int(N), int(M)
    if N < 1 or M < 1:
        raise ValueError(f"N and M must be positive, got {N}, {M}")
    return (N, M, False) if N >= M else (M, N, True)


def _start(N: int, M: int, seed: int | np.random.Generator) -> tuple[int, int, bool, np.random.Generator]:
    """What every generator starts from: the oriented (N, M) with N >= M, whether the
    result must be transposed back (:func:`_finish`), and the numpy generator of ``seed``."""
    N, M, transpose = _oriented_shape(N, M)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return N, M, transpose, rng


def _finish(X: np.ndarray, transpose: bool, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    X = X * float(sigma)
    if transpose:
        X = X.T
    return torch.from_numpy(np.ascontiguousarray(X)).to(dtype)


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k matrix with orthonormal columns, uniformly random (QR of a Gaussian)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def bbp_threshold(N: int, M: int) -> float:
    """theta_c = c^(1/4), c = min/max: the BBP threshold of a rank-one signal (module doc)."""
    N, M, _ = _oriented_shape(N, M)
    return (M / N) ** 0.25


def outlier_rel(theta: float, N: int, M: int) -> float:
    """Relative position ``lambda_out / lambda_plus - 1`` of the outlier of ``theta u v^T``.

    ``s^2 = (1 + theta^2)(c + theta^2) / theta^2`` over the edge ``(1 + sqrt c)^2``;
    0 at or below the BBP threshold (no outlier).
    """
    N, M, _ = _oriented_shape(N, M)
    c = M / N
    if theta <= c**0.25:
        return 0.0
    t = theta * theta
    return (1 + t) * (c + t) / t / (1 + math.sqrt(c)) ** 2 - 1.0


def theta_for_rel(rel: float, N: int, M: int) -> float:
    """Signal strength theta whose outlier sits at ``(1 + rel) lambda_plus`` (rel > 0).

    Solves ``(1 + t)(c + t) / t = y`` for t = theta^2 with ``y = (1 + rel)(1 + sqrt c)^2``:
    ``t = ((y - 1 - c) + sqrt((y - 1 - c)^2 - 4c)) / 2`` (the root above sqrt c).
    """
    if not rel > 0:
        raise ValueError(f"rel must be > 0, got {rel}")
    N, M, _ = _oriented_shape(N, M)
    c = M / N
    y = (1.0 + rel) * (1.0 + math.sqrt(c)) ** 2
    b = y - 1.0 - c
    t = 0.5 * (b + math.sqrt(max(b * b - 4.0 * c, 0.0)))
    return math.sqrt(t)


def _tw_rel(N: int, M: int) -> float:
    """One Tracy-Widom scale of lambda_max relative to lambda_plus (Johnstone 2001), sigma = 1."""
    lam_plus = N * (1 + math.sqrt(M / N)) ** 2
    return tracy_widom_scale(N, M)[1] / lam_plus


#: Bleeding-out window: outliers at least this many TW scales above the edge ...
BLEED_MIN_TW = 12.0
#: ... and at most this far above it, relative to lambda_plus.
BLEED_MAX_REL = 0.2


def bleeding_window(N: int, M: int) -> tuple[float, float]:
    """``(rel_lo, rel_hi)``: outlier positions that are unambiguously Bleeding-out.

    ``rel_lo = BLEED_MIN_TW * s_TW / lambda_plus`` (detectably out of the bulk),
    ``rel_hi = BLEED_MAX_REL`` (not yet a well-separated spike). Empty (lo >= hi) for
    small matrices, where the TW fluctuations of the edge are as wide as the window:
    there, Bleeding-out cannot be told from Random-like or Bulk+Spikes.
    """
    N, M, _ = _oriented_shape(N, M)
    return BLEED_MIN_TW * _tw_rel(N, M), BLEED_MAX_REL


def _spiked(
    N: int,
    M: int,
    rng: np.random.Generator,
    rels: np.ndarray,
) -> np.ndarray:
    """sqrt(N) (Z + sum_k theta_k u_k v_k^T) with outliers at relative positions ``rels``."""
    Z = rng.standard_normal((N, M))
    k = len(rels)
    U = _orthonormal(rng, N, k)
    V = _orthonormal(rng, M, k)
    thetas = np.array([theta_for_rel(float(r), N, M) for r in rels])
    # Z is sqrt(N) times the normalized noise, so the signal is scaled alike
    return Z + math.sqrt(N) * (U * thetas) @ V.T


# -------------------------------------------------------------------------- generators


def random_like(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    dist: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Random-like: i.i.d. entries of variance sigma^2 (pure noise, MP bulk, TW edge).

    ``dist``: ``"gaussian"``, ``"uniform"`` (like PyTorch's default Kaiming-uniform
    init) or ``"rademacher"``; ``None`` draws one of them from the seed.
    """
    N, M, tr, rng = _start(N, M, seed)
    if dist is None:
        dist = ("gaussian", "uniform", "rademacher")[int(rng.integers(3))]
    if dist == "gaussian":
        X = rng.standard_normal((N, M))
    elif dist == "uniform":
        X = rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), (N, M))
    elif dist == "rademacher":
        X = rng.choice(np.array([-1.0, 1.0]), size=(N, M))
    else:
        raise ValueError(f"dist must be 'gaussian', 'uniform' or 'rademacher', got {dist!r}")
    return _finish(X, tr, sigma, dtype)


def _spiked_phase(
    N: int,
    M: int,
    seed: int | np.random.Generator,
    sigma: float,
    rank: int | None,
    rel: float | np.ndarray | None,
    dtype: torch.dtype,
    *,
    draw_rank: Callable[[np.random.Generator, int], int],
    draw_rels: Callable[[np.random.Generator, int, int, int], np.ndarray],
) -> torch.Tensor:
    """The spiked generators: Gaussian noise plus ``rank`` signals with outliers at ``rel``.

    ``draw_rank(rng, M)`` and ``draw_rels(rng, N, M, rank)`` supply what was not given
    (drawn in that order, N >= M); a given ``rel`` is broadcast to every signal.
    """
    N, M, tr, rng = _start(N, M, seed)
    if rank is None:
        rank = draw_rank(rng, M)
    if rel is None:
        rels = draw_rels(rng, N, M, rank)
    else:
        rels = np.broadcast_to(np.asarray(rel, dtype=float), (rank,))
    return _finish(_spiked(N, M, rng, rels), tr, sigma, dtype)


def _bleeding_rels(rng: np.random.Generator, N: int, M: int, rank: int) -> np.ndarray:
    """``rank`` outlier positions drawn uniformly in :func:`bleeding_window` (raises if empty)."""
    lo, hi = bleeding_window(N, M)
    if lo >= hi:
        raise ValueError(
            f"Bleeding-out is not distinguishable at N={N}, M={M}: the edge's Tracy-Widom "
            f"fluctuations ({lo / BLEED_MIN_TW:.3f} of lambda_plus) leave no window below "
            f"rel={hi}; pass rel= explicitly or use a larger matrix"
        )
    return rng.uniform(lo, hi, size=rank)


def bleeding_out(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    rank: int | None = None,
    rel: float | np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Bleeding-out: Gaussian noise plus ``rank`` (default 1-3) signals just past BBP.

    The outliers sit at ``rel`` above lambda_plus (default: drawn uniformly in
    :func:`bleeding_window`); raises ValueError when that window is empty for this
    shape and no ``rel`` is given.
    """
    return _spiked_phase(
        N,
        M,
        seed,
        sigma,
        rank,
        rel,
        dtype,
        draw_rank=lambda rng, M: int(rng.integers(1, 4)),
        draw_rels=_bleeding_rels,
    )


def bulk_plus_spikes(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    rank: int | None = None,
    rel: float | np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Bulk+Spikes: Gaussian noise plus a few signals well past the BBP threshold.

    ``rank`` defaults to 1..max(1, min(5, M // 40)) and each outlier's ``rel`` to a
    log-uniform draw in [1, 10] (lambda_out between 2 and 11 lambda_plus).
    """
    return _spiked_phase(
        N,
        M,
        seed,
        sigma,
        rank,
        rel,
        dtype,
        draw_rank=lambda rng, M: int(rng.integers(1, max(1, min(5, M // 40)) + 1)),
        draw_rels=lambda rng, N, M, rank: np.exp(rng.uniform(math.log(1.0), math.log(10.0), size=rank)),
    )


def bulk_decay(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    top_rel: float | None = None,
    num_out: int | None = None,
    num_components: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Bulk-decay: Gaussian noise plus many correlated components of decaying strength.

    ``num_out`` components (default ``max(16, f M)``, f uniform in [0.04, 0.08]) are
    above the BBP threshold, with outliers at ``rel_k = top_rel k^(-gamma)``: from a spike
    at ``top_rel`` (default log-uniform in [2, 6]) down to ``rel = 0.03``, just above
    the edge, i.e. a power-law decaying continuum of eigenmass through the edge. The
    remaining components up to ``num_components`` (default min(M / 2, 3 num_out)) continue the decay
    below the threshold, ``theta_k = 0.95 theta_c (k / num_out)^(-1/2)``: invisible one by
    one, together they smear the top of the bulk ("the edge is no longer concave").
    ``top_rel <= 6`` keeps lambda_max < 7 lambda_plus (not lambda_max >> lambda_plus,
    which is Heavy-Tailed); ``num_out >= 16`` puts several outliers in the near-edge zone even for small M.
    """
    N, M, tr, rng = _start(N, M, seed)
    if top_rel is None:
        top_rel = float(np.exp(rng.uniform(math.log(2.0), math.log(6.0))))
    if num_out is None:
        num_out = max(16, int(round(rng.uniform(0.04, 0.08) * M)))
    K = int(num_components) if num_components is not None else min(M // 2, 3 * num_out)
    num_out = max(1, min(int(num_out), M))
    K = max(num_out, min(K, M))
    rel_end = 0.03
    k = np.arange(1, num_out + 1, dtype=float)
    gamma = math.log(top_rel / rel_end) / math.log(num_out) if num_out > 1 else 0.0
    thetas_out = np.array([theta_for_rel(float(r), N, M) for r in top_rel * k ** (-gamma)])
    theta_c = bbp_threshold(N, M)
    k_sub = np.arange(num_out + 1, K + 1, dtype=float)
    thetas = np.concatenate([thetas_out, 0.95 * theta_c * (k_sub / num_out) ** -0.5])
    Z = rng.standard_normal((N, M))
    U = _orthonormal(rng, N, K)
    V = _orthonormal(rng, M, K)
    X = Z + math.sqrt(N) * (U * thetas) @ V.T
    return _finish(X, tr, sigma, dtype)


def heavy_tailed(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    mu: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Heavy-Tailed: i.i.d. symmetric Pareto entries, ``P(|x| > t) = t^(-mu)`` for t >= 1.

    ``|x| = U^(-1/mu)`` with U uniform on (0, 1], random signs; ``mu`` defaults to a
    uniform draw in [1.0, 2.0]. For mu < 4 the ESD has no MP edge (docs/metrics.md section 3).
    """
    N, M, tr, rng = _start(N, M, seed)
    if mu is None:
        mu = float(rng.uniform(1.0, 2.0))
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    u = 1.0 - rng.random((N, M))  # in (0, 1]
    X = u ** (-1.0 / mu) * rng.choice(np.array([-1.0, 1.0]), size=(N, M))
    return _finish(X, tr, sigma, dtype)


def power_law_spikes(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    num_spikes: int,
    alpha: float = 3.0,
    lo: float = 0.5,
    cap: float = 200.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A trained-like ESD with a short power-law tail of known length: a Marchenko-Pastur
    bulk plus ``num_spikes`` outliers whose positions follow a power law.

    Gaussian noise plus ``num_spikes`` rank-one signals (HT-SR's picture of training:
    correlations carried by a few directions above a random bulk) with outliers at
    ``lambda / lambda_plus = x``, x drawn from the Pareto density ``p(x) ~ x^(-alpha)``
    on ``x >= 1 + lo`` and capped at ``cap``. With a few dozen spikes or more the power-law
    fit finds a tail of most of them (measured: 59 of 60 spikes of a 2048 x 2048 matrix,
    71 of 82 of a 4096 x 4096 one, alpha 2.7-2.9 for ``alpha = 3``), unlike
    :func:`heavy_tailed`, whose i.i.d. Pareto entries put 15-40 % of the eigenvalues of a
    4096-wide matrix in the fitted tail; with 20 spikes of 4096 it fitted the bulk's edge
    instead. Not one of the phase generators: depending on ``num_spikes`` the classifier
    reads Bulk+Spikes, Bulk-decay or Heavy-Tailed. Used by the tail path's benchmark and
    tests (experiments/bench_scale.py).
    """
    N, M, tr, rng = _start(N, M, seed)
    num_spikes = int(num_spikes)
    if not 0 < num_spikes <= M:
        raise ValueError(f"num_spikes must be in [1, M = {M}], got {num_spikes}")
    if not (alpha > 1 and lo > 0 and cap > 1 + lo):
        raise ValueError(f"need alpha > 1, lo > 0 and cap > 1 + lo, got {alpha}, {lo}, {cap}")
    x = (1.0 + lo) * (1.0 - rng.random(num_spikes)) ** (-1.0 / (alpha - 1.0))
    return _finish(_spiked(N, M, rng, np.minimum(x, cap) - 1.0), tr, sigma, dtype)


def rank_collapse(
    N: int,
    M: int,
    seed: int | np.random.Generator = 0,
    sigma: float = 1.0,
    *,
    mode: str | None = None,
    rank: int | None = None,
    dead_fraction: float | None = None,
    noise: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Rank-collapse: a large spike at lambda = 0 among the M meaningful eigenvalues.

    ``mode="low_rank"``: ``A B / sqrt(r) + noise * G`` with A (N x r), B (r x M)
    Gaussian and inner rank r (default uniform in [1, M / 2]): M - r eigenvalues sit at
    the noise level, ``noise^2`` relative to the signal's. ``mode="dead_units"``: a
    Gaussian matrix whose ``dead_fraction`` (default uniform in [0.5, 0.9]) of the M
    input units (columns) are all zero. ``None`` draws one of the two from the seed.
    """
    N, M, tr, rng = _start(N, M, seed)
    if mode is None:
        mode = ("low_rank", "dead_units")[int(rng.integers(2))]
    if mode == "low_rank":
        if rank is None:
            rank = int(rng.integers(1, max(1, M // 2) + 1))
        rank = max(1, min(int(rank), M))
        A = rng.standard_normal((N, rank))
        B = rng.standard_normal((rank, M))
        X = A @ B / math.sqrt(rank) + noise * rng.standard_normal((N, M))
    elif mode == "dead_units":
        if dead_fraction is None:
            dead_fraction = float(rng.uniform(0.5, 0.9))
        X = rng.standard_normal((N, M))
        dead = rng.permutation(M)[: int(round(dead_fraction * M))]
        X[:, dead] = 0.0
    else:
        raise ValueError(f"mode must be 'low_rank' or 'dead_units', got {mode!r}")
    return _finish(X, tr, sigma, dtype)


#: Phase value (the paper's name, :data:`esdwatch.schema.PHASES`) -> generator.
GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    Phase.RANDOM_LIKE.value: random_like,
    Phase.BLEEDING_OUT.value: bleeding_out,
    Phase.BULK_PLUS_SPIKES.value: bulk_plus_spikes,
    Phase.BULK_DECAY.value: bulk_decay,
    Phase.HEAVY_TAILED.value: heavy_tailed,
    Phase.RANK_COLLAPSE.value: rank_collapse,
}


def make_phase_matrix(phase: Any, N: int, M: int, seed: int = 0, sigma: float = 1.0, **kwargs: Any) -> torch.Tensor:
    """A seeded N x M matrix of ``phase``: a :class:`~esdwatch.schema.Phase`, its value
    (``"Bulk+Spikes"``) or its name (``"BULK_PLUS_SPIKES"``), in any case.

    Parameters not given in ``kwargs`` are drawn from the unambiguous ranges of the
    module docstring.
    """
    generator = None
    name = getattr(phase, "value", phase)
    if isinstance(name, str):
        try:
            generator = GENERATORS.get(Phase.parse(name).value)
        except ValueError:
            pass
    if generator is None:
        raise ValueError(f"no generator for phase {phase!r}; known: {sorted(GENERATORS)}")
    return generator(N, M, seed, sigma, **kwargs)
