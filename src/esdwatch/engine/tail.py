"""Tail-exact spectra of large matrices: certified top eigenvalues of W^T W, estimated bulk.

The power-law fit (alpha, x_min, D, n_tail), lambda_max, alpha-hat, the log spectral norm
and the trap test's outliers depend only on the top of the ESD, and the Frobenius norm
(log_norm, stable rank) needs no eigenvalue at all. For a large matrix this module
computes that top exactly, with a certificate, instead of every eigenvalue.

Top eigenvalues: block Krylov (block Lanczos with full reorthogonalization)
---------------------------------------------------------------------------
A = s^2 W^T W (M x M, W oriented N >= M, s the layer's scale) is applied implicitly,
``W^T (W X)``, to blocks X of b vectors. The basis Q = orth[X0, A X0, A^2 X0, ...] grows one
block per step (classical Gram-Schmidt run twice against the whole basis, then QR), and
A Q is kept. At checkpoints the Rayleigh-Ritz step takes H = Q^T A Q (float64),
H = S diag(theta) S^T, Ritz vectors y_j = Q s_j and their residuals
``r_j = ||A y_j - theta_j y_j||``, computed from the stored A Q. For symmetric A:

* some eigenvalue lies within r_j of theta_j (Bauer-Fike / Weyl); and
* with gap_j the distance from theta_j to the rest of the spectrum, within
  ``r_j^2 / gap_j`` (Kato-Temple); gap_j is estimated from the neighbouring Ritz values
  less their residuals, ``min_{j' != j} |theta_j - theta_j'| - r_j'``.
* theta_j <= lambda_j (Cauchy interlacing: the j-th Ritz value never exceeds the j-th
  eigenvalue), so Ritz values never invent mass above the spectrum.

The bound of theta_j is ``min(r_j, r_j^2 / gap_j)`` (r_j alone when gap_j <= r_j); the top
Ritz values are *certified* as long as every one above them has a bound <= ``rtol``
times itself (``DEFAULT_RTOL`` = 1e-4: a relative error delta on the tail eigenvalues moves
alpha by at most about 2 (alpha - 1)^2 delta < 2e-3 for alpha < 4). The certificate
assumes that the random start block has a component along every top eigenvector (true
with probability 1; a cluster wider than the block size b can be missed only when the
start block is nearly orthogonal to it), Ritz value j then approximates lambda_j.

How many eigenvalues (the stopping rule)
----------------------------------------
The Clauset-Shalizi-Newman scan (:mod:`esdwatch.engine.powerlaw`) tries every value as
x_min, so a fit on a truncated spectrum could pick another x_min. For a candidate x_min
inside the certified part, alpha and D depend only on the values above it and are those
of the full scan; the danger is a better candidate below the certified part. The basis
grows (checkpoints 1.5x apart) until the full scan of the pseudo-spectrum (below) picks a
certified x_min *and* the same x_min as at the previous checkpoint (stable under growth).
It gives up, and the layer falls back to the dense path, when that scan puts more than
a third of the basis cap in the tail (certifying n values took 4.5 to 6 n vectors: such a
tail cannot be certified within the cap). The benchmark
(experiments/results/bench_scale.md) measures how often a naive rule (stop as soon as
x_min is not the lowest certified value) picks another x_min than the full scan.

Bulk estimates (stochastic Lanczos quadrature)
----------------------------------------------
The same Krylov run is a block Gauss quadrature of the ESD (Golub & Meurant; Ubaru, Chen
& Saad, SIAM J. Matrix Anal. Appl. 2017): with a random orthonormal start block X0 of b
vectors, ``sum_i f(lambda_i) ~= sum_j w_j f(theta_j)`` with weights
``w_j = (M / b) ||X0^T y_j||^2`` (sum M), exact in expectation for polynomials of degree
< 2 x steps. The certified nodes get weight exactly 1 (their eigenvalues are known), the
other weights are rescaled to M - c, and the bulk's M - c values are the quantiles of
that discrete measure (each node repeated by its weight): a *pseudo-spectrum* of M values
whose top is exact, whose sum is matched to the exact ||sW||_F^2, and on which every
existing metric runs unchanged. Nodes below ``8 sqrt(M) eps theta_1`` (eps of the compute
precision; 4.6e-5 theta_1 at M = 2400 in float32) are set to 0: in float32 products a
null direction's Ritz value is noise of that size, so the rank-collapse fraction of a
tail record counts the eigenvalues below that floor, not below 1e-6 lambda_max. The null
mass is resolved once the Krylov basis exceeds the numerical rank of W (the space becomes
invariant); below that it is smeared over small nonzero nodes and the fraction is
underestimated (measured on 6000 x 2400: rank 200 -> 0.917 estimated 0.917 with a basis of
256, 0.861 with 128; rank 1000 -> 0.583 estimated 0.0 with 256; 60 % dead units -> 0.595
with 256, 0.0 with 128; Gaussian 2400 x 2400 -> 0.00125 estimated 0.0). Dead units are
counted exactly by the analyzer's screen (``dead_units``) on either path.
What is then estimated, and how well, is listed in :data:`ESTIMATED_METRICS`
(errors against the exact path: experiments/results/bench_scale.md).

The trap test's randomized matrix needs only its top eigenvalues above
``lambda_plus + 4 TW`` and a bulk for the MP fit: the same run with a smaller block,
until the count above the threshold is the same at two successive checkpoints (trap
eigenvalues are isolated and converge first). The count is an estimate either way: Ritz
values approach the eigenvalues from below, but the threshold comes from the MP fit of
the pseudo-spectrum, not of the exact one, so it can sit lower or higher than the exact
path's (on the benchmark's Pareto-entry matrices the counts differed by tens of traps in
both directions, the decision, traps or none, never: experiments/results/bench_scale.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esdwatch.engine.mp import DEFAULT_TW_MARGIN, fit_mp
from esdwatch.engine.powerlaw import PowerLawFit, fit_power_law

__all__ = [
    "DEFAULT_RTOL",
    "ESTIMATED_METRICS",
    "TAIL_DTYPE",
    "TopSpectrum",
    "top_spectrum",
    "tail_spectrum",
    "trap_spectrum",
    "pseudo_spectrum",
    "xmin_rule",
    "naive_xmin_rule",
]

#: Relative error bound an eigenvalue needs to count as certified.
DEFAULT_RTOL = 1e-4

#: Precision of the products W^T (W X); the Rayleigh-Ritz step and all metrics run in
#: float64. Decided per metric from measured errors (4096 x 2048 heavy-tailed, basis 512):
#: the top eigenvalues come out with the same relative errors from float32 and float64
#: products (5e-8 - 2e-7 for the top 5, 2e-7 / 3e-7 at index 10, 5e-6 / 6e-6 at index 20:
#: convergence, not rounding, limits them), so alpha, x_min, D and lambda_max take
#: float32 at 2.7x less time per block product (0.60 s against 1.60 s for 256 vectors on
#: 11008 x 4096, 2 threads). What float32 cannot resolve is the null space: Ritz values of
#: null directions come out at ~ sqrt(M) eps32 theta_1, hence the zero floor below and the
#: rank-collapse caveat. The exact path keeps its float64 Gram for the same reason: a float32
#: Gram + float64 eigvalsh gave the same alpha (to 5e-8), x_min, entropy (1e-9) and soft rank
#: on a 4096 x 4096 heavy-tailed matrix, but moved lambda_min by 34 % (bulk bottom).
TAIL_DTYPE = torch.float32

#: Metrics of a tail-path record that come from the quadrature bulk, not the exact spectrum
#: (LayerReport.estimated lists those of a record). The others (lambda_max, alpha, alpha_sigma,
#: xmin, xmax, D, n_tail, alpha_weighted, log_spectral_norm, log_norm, stable_rank) are
#: exact up to the certificate's rtol.
ESTIMATED_METRICS: tuple[str, ...] = (
    "lambda_min",
    "entropy",
    "numerical_rank",
    "rank_collapse_fraction",
    "log_alpha_norm",
    "mp_sigma2",
    "lambda_plus",
    "lambda_minus",
    "bulk_max",
    "tw_scale",
    "mp_ks",
    "mp_softrank",
    "num_spikes",
    "phase",
    "mass_above_edge",
    "energy_above_edge",
    "num_near_edge",
    "zero_gap",
    "tail_llr",
    "rand_distance",
    "rand_lambda_plus",
)

_DEFAULT_BLOCK = 32
# Ritz values of numerically null directions come out of float32 products at up to a few
# sqrt(M) eps32 theta_1 (measured: 1.3 sqrt(M) eps32 theta_1 on a rank-200 6000 x 2400 matrix)
_FLOOR_FACTOR = 8.0
_FIRST_CHECK_BLOCKS = 4
# Checkpoints grow the basis by this factor: a Rayleigh-Ritz step costs little next to the
# products, and a finer schedule stops closer to the basis a tail needs (doubling certified
# a 81-value tail of 4096 x 4096 at 512 vectors, but needed 1024 to see it twice)
_CHECK_GROWTH = 1.5
# The x_min rule gives up (the layer falls back to the dense path) when the full scan of
# the pseudo-spectrum puts more than this share of the basis cap in the tail: certifying
# n values took 4.5 to 6 n vectors on the benchmark's spectra, so such a tail cannot be
# certified within the cap and growing further only wastes products
_GIVE_UP_TAIL_SHARE = 1 / 3


@dataclass(frozen=True)
class TopSpectrum:
    """Result of :func:`top_spectrum`: certified top eigenvalues and the quadrature.

    Attributes:
        values: the certified eigenvalues, descending (float64).
        bounds: their error bounds (same order).
        ritz: every Ritz value of the last checkpoint, descending.
        weights: the quadrature weight of each Ritz value (sum M).
        trace: sum of all M eigenvalues, ||s W||_F^2 (exact).
        M: number of eigenvalues of the ESD.
        basis: Krylov basis size used; ``matvecs``: vectors multiplied by A.
        complete: the basis spans R^M, so ``ritz`` is the whole spectrum.
        fit: the power-law fit of the certified values (when the x_min rule ran).
        xmin_certified: the x_min rule held (or the spectrum is complete).
        floor: values below this are numerically zero in the compute precision.
    """

    values: np.ndarray
    bounds: np.ndarray
    ritz: np.ndarray
    weights: np.ndarray
    trace: float
    M: int
    basis: int
    matvecs: int
    complete: bool
    floor: float = 0.0
    fit: PowerLawFit | None = field(default=None, compare=False)
    xmin_certified: bool = False

    @property
    def num_certified(self) -> int:
        return int(self.values.size)


StopRule = Callable[[TopSpectrum, "TopSpectrum | None"], bool]


class _BlockKrylov:
    """The growing basis Q and A Q of A = s^2 W^T W (module docstring)."""

    def __init__(self, W: torch.Tensor, scale: float, dtype: torch.dtype, block: int, seed: int, cap: int):
        self.W = W
        self.scale2 = float(scale) ** 2
        M = W.shape[1]
        self.M = M
        self.block = max(1, min(block, M))
        self.cap = min(M, cap)
        gen = torch.Generator(device=W.device).manual_seed(int(seed))
        X = torch.randn(M, self.block, generator=gen, device=W.device, dtype=dtype)
        self.Q = torch.empty(M, self.cap, device=W.device, dtype=dtype)
        self.AQ = torch.empty(M, self.cap, device=W.device, dtype=dtype)
        self.Q[:, : self.block] = torch.linalg.qr(X).Q
        self.filled = self.block  # columns of Q
        self.done = 0  # columns of Q with A Q known

    def step(self) -> None:
        """A times the newest block; the next block orthogonalized against the basis."""
        X = self.Q[:, self.done : self.filled]
        Z = self.W.T @ (self.W @ X)
        if self.scale2 != 1.0:
            Z = Z * self.scale2
        self.AQ[:, self.done : self.filled] = Z
        self.done = self.filled
        room = self.cap - self.filled
        if room <= 0:
            return
        B = self.Q[:, : self.filled]
        Z = Z[:, : min(Z.shape[1], room)].clone()
        for _ in range(2):  # CGS2: twice is enough (Giraud et al. 2005)
            Z -= B @ (B.T @ Z)
        Qn = _orthonormalize(Z, B)
        self.Q[:, self.filled : self.filled + Qn.shape[1]] = Qn
        self.filled += Qn.shape[1]

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta descending, residual norms, quadrature weights) on the columns with A Q."""
        n = self.done
        Q, AQ = self.Q[:, :n], self.AQ[:, :n]
        H = (Q.T @ AQ).double()
        H = (H + H.T) * 0.5
        theta, S = torch.linalg.eigh(H)
        theta, S = theta.flip(0), S.flip(1)
        Sd = S.to(Q.dtype)
        Y = Q @ Sd
        R = AQ @ Sd - Y * theta.to(Q.dtype)
        # ||y_j|| = 1 up to the basis' loss of orthogonality: divide it out
        res = torch.linalg.vector_norm(R.double(), dim=0) / torch.linalg.vector_norm(Y.double(), dim=0)
        weights = S[: self.block].square().sum(dim=0) * (self.M / self.block)
        return theta.cpu().numpy(), res.cpu().numpy(), weights.cpu().numpy()


def _orthonormalize(Z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning Z (already orthogonal to B): Cholesky QR run twice.

    CholQR2 (Fukaya et al. 2014) is two Gram products and two triangular solves, far
    cheaper than Householder QR on a tall block; a rank-deficient Z (the Krylov space
    became invariant, e.g. a low-rank W) makes Cholesky fail, and then Householder QR
    with a re-orthogonalization against B gives valid (if arbitrary) new directions.
    """
    try:
        for _ in range(2):
            L, info = torch.linalg.cholesky_ex((Z.T @ Z).double())
            if int(info) != 0 or not bool(torch.isfinite(L).all()):
                raise RuntimeError("not positive definite")
            Z = torch.linalg.solve_triangular(L.to(Z.dtype), Z.T, upper=False).T
        eye = torch.eye(Z.shape[1], device=Z.device, dtype=Z.dtype)
        if float((Z.T @ Z - eye).abs().max()) > 1e-4:
            raise RuntimeError("Cholesky QR lost orthogonality")
        return Z
    except RuntimeError:
        Qn = torch.linalg.qr(Z).Q
        for _ in range(2):
            Qn = torch.linalg.qr(Qn - B @ (B.T @ Qn)).Q
        return Qn


def _bounds(theta: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Error bound of each Ritz value: min(r, r^2 / gap) with the estimated gap (module doc)."""
    n = theta.size
    gap = np.full(n, np.inf)
    if n > 1:
        lower = np.abs(theta[1:] - theta[:-1])
        gap[:-1] = np.minimum(gap[:-1], lower - res[1:])
        gap[1:] = np.minimum(gap[1:], lower - res[:-1])
    quad = np.where(gap > res, res * res / np.where(gap > 0, gap, 1.0), np.inf)
    return np.minimum(res, quad)


def _certified_count(theta: np.ndarray, bounds: np.ndarray, rtol: float, floor: float) -> int:
    ok = (bounds <= rtol * np.abs(theta)) | (theta <= floor) & (bounds <= floor)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else int(theta.size)


def _oriented2d(W: torch.Tensor) -> torch.Tensor:
    W = W.detach()
    if W.ndim == 3 and W.shape[0] == 1:
        W = W[0]
    if W.ndim != 2:
        raise ValueError(f"the tail path takes one matrix, got shape {tuple(W.shape)}")
    return W.T if W.shape[0] < W.shape[1] else W


def _squared_frobenius(W: torch.Tensor) -> float:
    """||W||_F^2 accumulated in float64 (the exact trace of W^T W).

    On the CPU through numpy's einsum, which accumulates in float64 without the float64
    copy of W that ``vector_norm(W, dtype=float64)`` makes (0.05 s against 0.30 s on
    11008 x 4096, one thread).
    """
    if W.device.type == "cpu" and W.dtype in (torch.float32, torch.float64) and not W.requires_grad:
        a = W.numpy()
        return float(np.einsum("ij,ij->", a, a, dtype=np.float64))
    return float(torch.linalg.vector_norm(W, dtype=torch.float64).square())


def top_spectrum(
    W: torch.Tensor,
    *,
    scale: float = 1.0,
    dtype: torch.dtype = TAIL_DTYPE,
    device: str | torch.device | None = None,
    block: int = _DEFAULT_BLOCK,
    rtol: float = DEFAULT_RTOL,
    stop: StopRule | None = None,
    first_check: int | None = None,
    max_basis: int | None = None,
    seed: int = 0,
) -> TopSpectrum:
    """Certified top eigenvalues of A = (s W)^T (s W) by block Krylov (module docstring).

    The basis grows by one block per step; at checkpoints (``first_check`` columns,
    default 4 blocks, then 1.5 times the last, in whole blocks) the Rayleigh-Ritz step
    certifies the top values and ``stop(current, previous)`` decides whether to go on. Without ``stop`` the first
    checkpoint is the last. Growth ends at ``max_basis`` (default M) or when the basis
    spans R^M (then every eigenvalue is known: ``complete``).
    """
    W = _oriented2d(W)
    target = torch.device(device) if device is not None else W.device
    Wc = W.to(device=target, dtype=dtype)
    M = Wc.shape[1]
    trace = _squared_frobenius(W) * float(scale) ** 2
    cap = M if max_basis is None else max(1, min(M, int(max_basis)))
    kry = _BlockKrylov(Wc, scale, dtype, block, seed, cap + block)
    check = max(kry.block, first_check or _FIRST_CHECK_BLOCKS * kry.block)
    previous: TopSpectrum | None = None
    while True:
        while kry.done < min(check, cap, M) and kry.done < kry.filled:
            kry.step()
        current = _checkpoint(kry, trace, dtype, rtol)
        # the rule is asked at every checkpoint, the last one (at the cap) included
        if stop is None or current.complete or stop(current, previous) or kry.done >= cap:
            return current
        previous = current
        check = kry.done + max(kry.block, math.ceil((_CHECK_GROWTH - 1.0) * kry.done / kry.block) * kry.block)


def _checkpoint(kry: _BlockKrylov, trace: float, dtype: torch.dtype, rtol: float) -> TopSpectrum:
    theta, res, weights = kry.ritz()
    complete = kry.done >= kry.M
    top = float(theta[0]) if theta.size else 0.0
    floor = _FLOOR_FACTOR * math.sqrt(kry.M) * float(torch.finfo(dtype).eps) * max(top, 0.0)
    if complete:
        bounds = res
        c = theta.size
    else:
        bounds = _bounds(theta, res)
        c = _certified_count(theta, bounds, rtol, floor)
    return TopSpectrum(
        values=theta[:c].copy(),
        bounds=bounds[:c].copy(),
        ritz=theta,
        weights=weights,
        trace=trace,
        M=kry.M,
        basis=kry.done,
        matvecs=kry.done,
        complete=complete,
        floor=floor,
    )


def pseudo_spectrum(ts: TopSpectrum) -> np.ndarray:
    """M ascending values: the certified top, then the quadrature bulk (module docstring).

    The bulk is the M - c quantiles of the Ritz nodes below the certified part, each
    weighted by its quadrature weight (rescaled to M - c), rescaled so that the M values
    sum to the exact trace; nodes below ``ts.floor`` are 0.
    """
    M, c = ts.M, ts.num_certified
    if ts.complete:  # every eigenvalue: as the dense path gives them (clipped at 0)
        return np.sort(np.clip(ts.ritz, 0.0, None))
    top = np.clip(ts.values, 0.0, None)
    nodes = np.clip(ts.ritz[c:], 0.0, None)
    w = np.clip(ts.weights[c:], 0.0, None)
    rest = M - c
    if rest <= 0 or nodes.size == 0 or not w.sum() > 0:
        bulk = np.zeros(max(rest, 0))
    else:
        nodes[nodes < ts.floor] = 0.0
        order = np.argsort(nodes)
        nodes, w = nodes[order], w[order] * (rest / w.sum())
        bulk = _quantiles(nodes, w, rest)
        if top.size:
            bulk = np.minimum(bulk, top[-1])
        remaining = ts.trace - float(top.sum())
        total = float(bulk.sum())
        if total > 0 and remaining > 0:
            bulk = np.minimum(bulk * (remaining / total), top[-1] if top.size else np.inf)
    return np.sort(np.concatenate([bulk, top]))


def _quantiles(nodes: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """n quantiles (plotting positions i + 1/2) of the measure sum_k w_k delta(x - nodes_k).

    The mass at 0 (numerical zeros) is kept as exact zeros; above it the quantile function
    is interpolated linearly through the middles of the nodes' weight blocks, so that a
    smooth bulk stays smooth (a staircase would put spikes into a log histogram).
    """
    positions = np.arange(n) + 0.5
    zero_mass = float(w[nodes <= 0].sum())
    x, v = nodes[nodes > 0], w[nodes > 0]
    if x.size == 0:
        return np.zeros(n)
    mids = zero_mass + np.cumsum(v) - 0.5 * v
    out = np.interp(positions, mids, x)
    out[positions < zero_mass] = 0.0
    return out


def naive_xmin_rule(values: np.ndarray) -> tuple[bool, PowerLawFit]:
    """Stop as soon as the truncated fit's x_min is not the lowest certified value."""
    fit = fit_power_law(values)
    return bool(fit.ok and fit.n_tail < values.size), fit


def xmin_rule(ts: TopSpectrum, previous: PowerLawFit | None) -> tuple[bool, PowerLawFit]:
    """The strict rule: the full scan of the pseudo-spectrum picks a certified x_min, twice.

    The Clauset-Shalizi-Newman scan runs over every value of the pseudo-spectrum (certified
    top plus the quadrature bulk), so candidates below the certified part compete with
    their estimated values; the rule holds when the winner is a certified value and is the
    same as at the previous checkpoint, and never while every Ritz value is certified (no
    uncertified node carries a bulk estimate, so nothing below the certified part would
    compete). alpha, D and n_tail of a certified x_min depend only on the certified values
    (the fit returned is that of the certified values).
    """
    values = ts.values
    full = fit_power_law(pseudo_spectrum(ts))
    fit = fit_power_law(values, xmin=full.xmin) if full.ok and values.size else full
    # the candidates below the certified part compete only through the quadrature bulk, which
    # the uncertified Ritz nodes carry: with every node certified the bulk is empty (zeros), the
    # scan sees only the certified values, and a lower x_min would go unseen (a 4096 x 4096
    # Pareto-entry matrix, mu ~ 1.5: every Ritz value certified at 448 vectors, x_min picked at
    # n_tail 78, the full scan's at 939)
    has_bulk = ts.complete or bool(np.clip(ts.weights[ts.num_certified :], 0.0, None).sum() > 0)
    inside = full.ok and has_bulk and values.size >= 4 and full.xmin >= values[-1] and full.n_tail <= values.size
    # the same order statistic; its value moves by rounding between checkpoints
    stable = (
        previous is not None
        and previous.ok
        and previous.n_tail == full.n_tail
        and abs(previous.xmin - full.xmin) <= DEFAULT_RTOL * full.xmin
    )
    return bool(inside and stable), (fit if inside else full)


def tail_spectrum(
    W: torch.Tensor,
    *,
    scale: float = 1.0,
    dtype: torch.dtype = TAIL_DTYPE,
    device: str | torch.device | None = None,
    rtol: float = DEFAULT_RTOL,
    max_basis: int | None = None,
    block: int = _DEFAULT_BLOCK,
    seed: int = 0,
    rule: str = "strict",
) -> TopSpectrum:
    """:func:`top_spectrum` grown until the power-law x_min is certified (module docstring).

    ``rule="naive"`` stops as soon as x_min is not the lowest certified value (for the
    benchmark's comparison). The returned ``fit`` is that of the certified values.
    The strict rule gives up early (``xmin_certified`` False, the caller falls back to the
    dense path) when the full scan of the pseudo-spectrum puts more than a third of the
    basis cap in the tail: a tail that long cannot be certified within the cap.
    """
    fits: dict[int, PowerLawFit] = {}
    met: dict[int, bool] = {}
    give_up_n = _GIVE_UP_TAIL_SHARE * (max_basis if max_basis is not None else _oriented2d(W).shape[1])

    def stop(current: TopSpectrum, previous: TopSpectrum | None) -> bool:
        if rule == "naive":
            if current.num_certified < 4:
                return False
            done, fit = naive_xmin_rule(current.values)
        else:
            prev_fit = fits.get(previous.basis) if previous is not None else None
            done, fit = xmin_rule(current, prev_fit)
        fits[current.basis] = fit
        met[current.basis] = done
        # not done: ``fit`` is the full scan of the pseudo-spectrum, n_tail its estimate
        return done or (rule != "naive" and fit.ok and fit.n_tail > give_up_n)

    ts = top_spectrum(
        W, scale=scale, dtype=dtype, device=device, block=block, rtol=rtol, stop=stop, max_basis=max_basis, seed=seed
    )
    fit = fits.get(ts.basis)
    if fit is None or ts.complete:
        fit = fit_power_law(pseudo_spectrum(ts) if ts.complete else ts.values)
    return dataclasses.replace(ts, fit=fit, xmin_certified=ts.complete or met.get(ts.basis, False))


def trap_spectrum(
    R: torch.Tensor,
    N: int,
    M: int,
    *,
    dtype: torch.dtype = TAIL_DTYPE,
    device: str | torch.device | None = None,
    tw_margin: float = DEFAULT_TW_MARGIN,
    block: int = 16,
    max_basis: int | None = None,
    seed: int = 1,
) -> TopSpectrum:
    """Top of the randomized matrix's spectrum for the trap test (module docstring).

    Grows until the number of Ritz values above ``lambda_plus + tw_margin * TW`` (from
    the MP fit of the pseudo-spectrum) is the same at two successive checkpoints, or is
    positive at both (the decision is then settled; the count is an estimate, see the module
    docstring, and the record lists ``num_traps`` as estimated).
    """
    counts: dict[int, int] = {}

    def count(ts: TopSpectrum) -> int:
        mp = fit_mp(pseudo_spectrum(ts), N, M, tw_margin=tw_margin)
        threshold = mp.lambda_plus + tw_margin * mp.tw_scale
        return int(np.count_nonzero(ts.ritz > threshold)) if math.isfinite(threshold) else -1

    def stop(current: TopSpectrum, previous: TopSpectrum | None) -> bool:
        counts[current.basis] = count(current)
        if previous is None:
            return False
        before = counts.get(previous.basis, -1)
        # the count settled, or the decision (traps or not) did
        return counts[current.basis] == before or (counts[current.basis] > 0 and before > 0)

    return top_spectrum(
        R,
        dtype=dtype,
        device=device,
        block=block,
        rtol=1e-3,
        stop=stop,
        first_check=8 * block,
        max_basis=max_basis,
        seed=seed,
    )


def tail_overrides(ts: TopSpectrum) -> dict[str, Any]:
    """LayerReport power-law fields from the certified fit (they replace the pseudo-spectrum's)."""
    fit = ts.fit
    if fit is None:
        return {}
    out: dict[str, Any] = {
        "alpha": fit.alpha,
        "alpha_sigma": fit.sigma,
        "xmin": fit.xmin,
        "xmax": fit.xmax,
        "D": fit.D,
        "n_tail": int(fit.n_tail),
    }
    if math.isfinite(fit.alpha) and ts.values.size and ts.values[0] > 0:
        out["alpha_weighted"] = fit.alpha * math.log10(float(ts.values[0]))
    return out


# ------------------------------------------------------------------------- per layer

#: Smallest M for which ``spectrum="auto"`` takes the tail path, per device type. Below it
#: the dense eigensolver is as fast or faster (crossover measured in
#: experiments/results/bench_scale.md); on a GPU the dense eigvalsh is fast up to larger M.
AUTO_MIN_M: dict[str, int] = {"cpu": 2048, "cuda": 8192}

#: Under ``spectrum="auto"`` (with ``method="auto"``), a matrix with N >= AUTO_MIXED_MIN_Q * M
#: is decomposed by the ``"mixed"`` route of :mod:`esdwatch.engine.spectrum` (float32 Gram
#: product, float64 eigenvalues): there the product dominates the cost (1.2x on 11008 x
#: 4096, 1.5x on 32000 x 4096, 4x on GPT-2's 50257 x 768 embedding) and the MP bulk stays
#: away from zero, where the product's rounding would show. On square matrices the
#: eigensolver dominates (1.13x on 4096 x 4096) and their smallest eigenvalues reach zero,
#: so they keep the float64 product (experiments/results/precision.md).
AUTO_MIXED_MIN_Q = 2.0

#: In ``"auto"``, the Krylov basis may grow to this share of M before the layer falls back
#: to the dense path: a tail that needs more costs the tail path more than a dense solve,
#: and a small share bounds what a fallback wastes (about 4 N M^2 / 8 float32 flops, less
#: when the x_min rule gives up early). M / 16 certified no tail longer than about 35
#: values of 4096; M / 8 certifies the 70-value tails of bulk + power-law-spike spectra
#: (experiments/results/bench_scale.md).
AUTO_MAX_BASIS_FRACTION = 1 / 8

#: With ``"tail"`` forced, the basis may grow further (to M / 4, at least 512 vectors; a
#: complete basis would cost more than the dense path); beyond it the layer falls back to
#: the dense path as well.
TAIL_MAX_BASIS_FRACTION = 0.25

SPECTRUM_MODES = ("exact", "tail", "auto")


def check_spectrum(spectrum: str) -> str:
    """``spectrum`` if it is one of :data:`SPECTRUM_MODES`, else a ValueError."""
    if spectrum not in SPECTRUM_MODES:
        raise ValueError(f"spectrum must be one of {SPECTRUM_MODES}, got {spectrum!r}")
    return spectrum


def uses_tail(mat: Any, spectrum: str, device: str | None = None) -> bool:
    """Whether layer ``mat`` (a LayerMatrix) takes the tail path under ``spectrum``.

    Only single matrices do (conv stacks and LoRA factors stay exact); ``"auto"`` picks the
    tail path for M >= :data:`AUTO_MIN_M` of the device the layer is analysed on.
    """
    if spectrum == "exact" or mat.num_slices != 1 or mat.kind == "lora":
        return False
    if spectrum == "tail":
        return True
    dev = torch.device(device) if device is not None else mat.weight.device
    return int(mat.M) >= AUTO_MIN_M.get(dev.type, AUTO_MIN_M["cuda"])


@dataclass
class TailLayer:
    """What the tail path found for one layer (the analyzer merges it into the report).

    ``evals``: the pseudo-spectrum, or None when the layer fell back to the dense path;
    ``rand``: the randomized matrix's pseudo-spectrum (trap test) or None;
    ``overrides``: report fields from the certified fit; ``estimated``: metric names that
    are estimates in this record.
    """

    evals: np.ndarray | None
    rand: np.ndarray | None
    overrides: dict[str, Any]
    estimated: tuple[str, ...]
    top: TopSpectrum | None = None


_TRAP_ESTIMATED = ("rand_distance", "rand_lambda_plus")


def tail_layer(
    mat: Any,
    *,
    spectrum: str,
    device: str | None = None,
    traps: bool = True,
    seed: int = 0,
    tw_margin: float = DEFAULT_TW_MARGIN,
) -> TailLayer:
    """Tail-path spectra of one layer: original (or None: dense fallback) and randomized."""
    from esdwatch.engine.metrics import log_alpha_norm
    from esdwatch.engine.traps import randomize_matrix

    W = mat.weight[0] if mat.weight.ndim == 3 else mat.weight
    M = int(mat.M)
    if spectrum == "tail":
        max_basis = max(16 * _DEFAULT_BLOCK, int(TAIL_MAX_BASIS_FRACTION * M))
    else:
        max_basis = max(4 * _DEFAULT_BLOCK, int(AUTO_MAX_BASIS_FRACTION * M))
    ts = tail_spectrum(W, scale=mat.scale, device=device, max_basis=max_basis, seed=seed)
    certified = ts.xmin_certified
    evals: np.ndarray | None = None
    overrides: dict[str, Any] = {}
    estimated: tuple[str, ...] = ()
    if certified:
        evals = pseudo_spectrum(ts)
        if not ts.complete:
            overrides = tail_overrides(ts)
            if math.isfinite(overrides.get("alpha", math.nan)):
                overrides["log_alpha_norm"] = log_alpha_norm(evals, overrides["alpha"])
            estimated = ESTIMATED_METRICS
    rand = None
    if traps:
        R = randomize_matrix(mat.weight, seed=seed)
        R = R[0] if R.ndim == 3 else R
        rts = trap_spectrum(R, mat.N, M, device=device, tw_margin=tw_margin, max_basis=min(512, max(128, M // 8)))
        rand = pseudo_spectrum(rts)
        if not rts.complete:
            estimated = tuple(dict.fromkeys(estimated + _TRAP_ESTIMATED + ("num_traps",)))
    return TailLayer(evals=evals, rand=rand, overrides=overrides, estimated=estimated, top=ts)
