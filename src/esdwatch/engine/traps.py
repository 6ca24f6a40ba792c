"""Correlation traps (docs/metrics.md section 6): large elements that masquerade as signal.

Randomize W element-wise (a seeded random permutation of its entries, centered on their
mean, see :func:`randomize_matrix`) and recompute the ESD. The permutation keeps every
entry, so it keeps their distribution, and destroys every correlation between rows and
columns. A healthy randomized ESD is therefore Marchenko-Pastur. If the randomized ESD
still has eigenvalues far above its *own* MP edge, they come from a few unusually large
elements (an isolated entry x puts an eigenvalue near x^2 whatever its position):
spurious eigenvalues that are not due to correlations learned from the data, typical of
too large a learning rate.

Definitions
-----------
* ``num_traps``: randomized eigenvalues above ``lambda_plus_rand + tw_margin * s_rand``,
  with lambda_plus_rand and the Tracy-Widom scale s_rand from the robust MP fit
  (:func:`esdwatch.engine.mp.fit_mp`) of the *randomized* ESD and ``tw_margin`` = 4 (the spike
  margin of the MP fit: a pure-noise matrix passes it with probability < 1e-3).
* ``rand_distance``: the Jensen-Shannon distance (base 2, in [0, 1]) between the
  histograms of log10(lambda) of W and of its randomization, on common bins. Why this
  one: it is symmetric and bounded (KL is neither, and is infinite when one ESD has mass
  where the other has none, as a spike does); it is the square root of a divergence,
  hence a metric; and log10 bins make it scale-free and resolve heavy tails that span
  decades, where a linear histogram would put the whole bulk into one bin. It measures
  how much correlation W carries: ~0 for a random matrix (the randomization changes
  nothing), large when the learned structure (spikes, heavy tail, low rank, and a
  nonzero mean of the entries, which the centered randomization removes) is destroyed by
  the permutation. Finite samples give a small floor (about 0.05 - 0.15
  for M = 2000 - 100 with the default bins, :func:`esd_distance`).
* ``entries``: the ``min(top_k, num_traps)`` entries of W farthest from their mean, as
  ``(row, col, value)`` (plus the slice for a stack): the likely culprits, one per trap.
  Large entries that the permutation happens to put in one row or column make a single
  eigenvalue, so ``num_traps`` can be smaller than the number of large entries (and
  vary a little with the seed).

Cost: one more eigendecomposition per layer. :func:`trap_fields_from_evals` takes
already computed randomized eigenvalues so that the engine can decompose them in the
same batched call as the originals (``randomize_matrix`` then ``batch_eigenvalues``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from esdwatch.engine.mp import DEFAULT_TW_MARGIN, fit_mp
from esdwatch.engine.spectrum import Method, batch_eigenvalues

if TYPE_CHECKING:
    from esdwatch.engine.layers import LayerMatrix

__all__ = [
    "TrapEntry",
    "TrapResult",
    "randomize_matrix",
    "esd_distance",
    "largest_entries",
    "trap_fields_from_evals",
    "correlation_traps",
    "trap_fields",
    "clear_permutation_cache",
    "DEFAULT_TOP_K",
]

NAN = float("nan")

#: How many offending entries are reported at most.
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class TrapEntry:
    """One large element of W: position, value and size in entry standard deviations."""

    row: int
    col: int
    value: float
    zscore: float = NAN
    slice: int = 0

    def __str__(self) -> str:
        where = f"{self.row},{self.col}" if self.slice == 0 else f"{self.slice}:{self.row},{self.col}"
        return f"({where})={self.value:.4g}"


@dataclass(frozen=True)
class TrapResult:
    """Outcome of :func:`correlation_traps` (eigenvalues unnormalized, lambda = nu^2).

    Attributes
    ----------
    num_traps:
        Randomized eigenvalues beyond the randomized ESD's own MP edge + TW margin.
    rand_distance:
        Jensen-Shannon distance between the log10-ESDs of W and of its randomization.
    rand_lambda_max, rand_lambda_plus, rand_sigma2, rand_tw_scale:
        Largest randomized eigenvalue and the MP fit of the randomized ESD.
    lambda_max:
        Largest eigenvalue of W itself.
    entries:
        The ``min(top_k, num_traps)`` entries of W farthest from their mean (empty if no trap),
        in W's own coordinates as passed in.
    seed:
        Seed of the permutation.
    """

    num_traps: int
    rand_distance: float
    rand_lambda_max: float
    rand_lambda_plus: float
    rand_sigma2: float = NAN
    rand_tw_scale: float = NAN
    lambda_max: float = NAN
    entries: tuple[TrapEntry, ...] = ()
    seed: int = 0
    rand_evals: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def has_traps(self) -> bool:
        return self.num_traps > 0

    def entries_str(self) -> str:
        return format_entries(self.entries)


def format_entries(entries: Sequence[TrapEntry]) -> str:
    """Short text form ``"(row,col)=value; ..."`` (``slice:row,col`` for a stack slice > 0)."""
    return "; ".join(str(e) for e in entries)


# ------------------------------------------------------------------------- building blocks


#: Permutation indices kept per (size, seed, device): a monitor randomizes the same
#: shapes at every snapshot and a model repeats shapes across layers, while drawing a
#: uniform permutation is cache-miss bound (figures: experiments/results/engine_design_notes.md).
#: Bounded by the total number of int32 indices held (64M: 256 MB at most).
_PERM_CACHE: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
_PERM_CACHE_MAX_ENTRIES = 64 * 2**20
_PERM_CACHE_LOCK = threading.Lock()


def _permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """The seeded uniform permutation of range(n) (int32), drawn on the CPU, cached."""
    key = (n, seed, str(device))
    with _PERM_CACHE_LOCK:
        perm = _PERM_CACHE.get(key)
        if perm is not None:
            _PERM_CACHE.move_to_end(key)
            return perm
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # drawn directly as int32 (faster than int64 then a cast; half the memory)
    dtype = torch.int32 if n < 2**31 else torch.int64
    perm = torch.randperm(n, generator=gen, dtype=dtype).to(device=device)
    if n <= _PERM_CACHE_MAX_ENTRIES:
        with _PERM_CACHE_LOCK:
            _PERM_CACHE[key] = perm
            while sum(p.numel() for p in _PERM_CACHE.values()) > _PERM_CACHE_MAX_ENTRIES:
                _PERM_CACHE.popitem(last=False)
    return perm


def clear_permutation_cache() -> None:
    """Forget every cached permutation (see ``randomize_matrix``), e.g. to time a cold trap test."""
    with _PERM_CACHE_LOCK:
        _PERM_CACHE.clear()


def randomize_matrix(W: torch.Tensor, seed: int = 0, *, center: bool = True) -> torch.Tensor:
    """W with its entries randomly permuted (seeded), about their mean: same shape, dtype, device.

    ``center=True`` (the trap test's randomization) returns ``P(W) - mean(W)``, the
    permuted entries minus their mean; ``center=False`` the plain permutation ``P(W)``.
    Why center: a permutation keeps the mean mu of the entries, and mu 1 1^T is a
    rank-one matrix whose eigenvalue ~ mu^2 N M leaves the randomized MP bulk as soon as
    ``|mu| sqrt(M) / sigma > (M / N)^(1/4)`` (the BBP threshold; a mean of 1/16 of the
    entry std suffices for a 256 x 256 layer, and trained ReLU layers often have one). That
    outlier says nothing about large elements, so without centering the trap test would
    flag it as a trap. Centering removes that outlier and is otherwise a rank-one change
    (the other eigenvalues interlace), so it does not hide large elements.

    A 2-D W is permuted as a whole; an (S, N, M) stack slice by slice (one permutation of
    the N * M positions, applied to every slice; each slice centered on its own mean), so
    each slice keeps its own entries. The permutation is drawn on the CPU with a seeded
    ``torch.Generator``, so it is the same on every device, and cached per size and
    seed (:func:`clear_permutation_cache` empties that cache).
    """
    W = torch.as_tensor(W)
    if W.ndim < 2:
        raise ValueError(f"randomize_matrix needs a matrix or a stack of matrices, got shape {tuple(W.shape)}")
    per = W.shape[-2] * W.shape[-1]
    perm = _permutation(per, int(seed), W.device)
    # index_select gathers faster than advanced indexing on the CPU
    source = W.reshape(-1, per)
    flat = torch.index_select(source, 1, perm, out=_empty(source.shape, source.dtype, source.device))
    if center and W.is_floating_point():
        # the gathered copy is ours: center it in place, in W's dtype
        flat.sub_(_row_means(W.reshape(-1, per)).to(W.dtype))
    return flat.reshape(W.shape)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor; on the CPU backed by numpy's allocator when numpy has the dtype.

    numpy asks the kernel for transparent huge pages on large arrays, torch does not, so
    a large gather into a fresh torch buffer spends much of its time faulting in 4 kB
    pages (figures: experiments/results/engine_design_notes.md).
    """
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))
    return torch.empty(shape, dtype=dtype, device=device)


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and (n - 1) standard deviation of a 1-D tensor, accumulated in float64.

    On the CPU through numpy (a float64 sum and a float64 sum of squares), which is
    faster there than ``torch.std_mean`` (experiments/results/engine_design_notes.md).
    """
    n = values.numel()
    if n < 2:
        return (float(values[0].item()) if n else NAN), NAN
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        a = values.numpy()
        mean = float(a.sum(dtype=np.float64)) / n
        sq = float(np.einsum("i,i->", a, a, dtype=np.float64))
        return mean, math.sqrt(max(sq - n * mean * mean, 0.0) / (n - 1))
    std_t, mean_t = torch.std_mean(values.to(torch.float64))
    return float(mean_t.item()), float(std_t.item())


def _row_means(flat: torch.Tensor) -> torch.Tensor:
    """Means of the rows of a 2-D tensor, accumulated in float64, as an (S, 1) float64 tensor.

    float64 because a float16/float32 running sum over a large layer loses the mean; on
    the CPU through numpy, whose pairwise float64 sum of float32 data reads the weights
    once (torch's ``sum(dtype=float64)`` casts a copy first).
    """
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        sums = flat.detach().numpy().sum(axis=1, dtype=np.float64, keepdims=True)
        return torch.from_numpy(sums / flat.shape[1])
    return flat.to(torch.float64).mean(dim=1, keepdim=True)


def _as_numpy(evals: Any) -> np.ndarray:
    if hasattr(evals, "detach"):
        evals = evals.detach().cpu().double().numpy()
    return np.asarray(evals, dtype=np.float64).ravel()


def esd_distance(evals_a: Any, evals_b: Any, bins: int | None = None) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two log10-ESD histograms.

    ``JSD(P, Q) = sqrt( (KL(P || A) + KL(Q || A)) / 2 )`` with ``A = (P + Q) / 2``, P and
    Q the normalized histograms of log10(lambda) on ``bins`` common, equal-width bins
    spanning both samples (default ``clip(n / 10, 20, 100)`` for n the smaller sample:
    about ten eigenvalues per bin keeps the sampling floor low). Eigenvalues below
    ``1e-12 * max`` (zeros) are put at that floor, so that a mass at zero counts as mass
    at the bottom of the histogram.
    """
    a, b = _as_numpy(evals_a), _as_numpy(evals_b)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return NAN
    top = max(float(a.max()), float(b.max()))
    if not top > 0:
        return 0.0 if float(a.max()) == float(b.max()) else 1.0
    floor = top * 1e-12
    la = np.log10(np.maximum(a, floor))
    lb = np.log10(np.maximum(b, floor))
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    if not hi > lo:
        return 0.0
    if bins is None:
        bins = int(np.clip(min(a.size, b.size) // 10, 20, 100))
    edges = np.linspace(lo, hi, int(bins) + 1)
    p = np.histogram(la, edges)[0].astype(float)
    q = np.histogram(lb, edges)[0].astype(float)
    p /= p.sum()
    q /= q.sum()
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.5 * (kl_p + kl_q), 0.0)))


def _extreme_candidates(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (into ``rows``, n x m) of its k largest and k smallest entries.

    The k largest entries lie in the k rows with the largest maxima (a row holding one has
    its maximum at or above the k-th largest value, and at most k rows can, ties aside), so
    after one pass for the row extremes the top-k runs over k rows only, not over every
    entry. Likewise for the smallest. Among exactly tied values another index may be returned.
    """
    width = rows.shape[1]
    lows, highs = torch.aminmax(rows, dim=1)
    out = []
    for extremes, largest in ((highs, True), (lows, False)):
        picked = torch.topk(extremes, min(k, rows.shape[0]), largest=largest).indices
        block = rows[picked].reshape(-1)
        j = torch.topk(block, min(k, block.numel()), largest=largest).indices
        out.append(picked[j // width] * width + j % width)
    return torch.cat(out).unique()


def largest_entries(W: Any, k: int, *, transpose: bool = False) -> tuple[TrapEntry, ...]:
    """The k entries of W farthest from the entries' mean (2-D, or (S, N, M) with slice indices).

    ``transpose`` swaps row and column in the output (for an oriented view of a stored
    (M x N) parameter, so positions refer to the parameter as stored).
    """
    W = torch.as_tensor(W).detach()
    if k <= 0 or W.numel() == 0:
        return ()
    if W.ndim >= 2 and not W.is_contiguous() and W.transpose(-2, -1).is_contiguous():
        # an oriented view of a stored parameter: read the storage as it is (no copy)
        W, transpose = W.transpose(-2, -1), not transpose
    Wf = W if W.dtype in (torch.float32, torch.float64) else W.to(torch.float64)
    values = Wf.reshape(-1)
    k = min(int(k), values.numel())
    # ranked by distance from the mean of the entries (what the centered randomization
    # sees); the k farthest from it are among the k largest and the k smallest entries,
    # found without materializing |W - mean| (a copy of an embedding, 12M entries)
    mean, std = _mean_std(values)
    cand = _extreme_candidates(Wf.reshape(-1, Wf.shape[-1]) if Wf.ndim >= 2 else Wf.reshape(1, -1), k)
    distance = (values[cand].to(torch.float64) - mean).abs()
    idx = cand[torch.argsort(distance, descending=True, stable=True)[:k]]
    flat = values
    shape = tuple(W.shape)
    out = []
    for i in idx.tolist():
        if len(shape) == 3:
            s, rem = divmod(i, shape[1] * shape[2])
            r, c = divmod(rem, shape[2])
        else:
            s = 0
            r, c = divmod(i, shape[-1])
        if transpose:
            r, c = c, r
        v = float(flat[i].item())
        out.append(
            TrapEntry(
                row=int(r), col=int(c), value=v, zscore=(v - mean) / std if std and std > 0 else NAN, slice=int(s)
            )
        )
    return tuple(out)


def _rand_fit(rand_evals: np.ndarray, N: int, M: int, tw_margin: float) -> tuple[int, float, float, float, float]:
    """(num_traps, rand_lambda_max, rand_lambda_plus, rand_sigma2, rand_tw_scale)."""
    lam_max = float(rand_evals.max()) if rand_evals.size else NAN
    mp = fit_mp(rand_evals, N, M, tw_margin=tw_margin)
    lp, s = float(mp.lambda_plus), float(mp.tw_scale)
    if not (math.isfinite(lp) and math.isfinite(s)):
        return -1, lam_max, lp, float(mp.sigma2), s
    n = int(np.count_nonzero(rand_evals > lp + tw_margin * s))
    return n, lam_max, lp, float(mp.sigma2), s


def trap_fields_from_evals(
    W: Any,
    evals: Any,
    rand_evals: Any,
    N: int,
    M: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    tw_margin: float = DEFAULT_TW_MARGIN,
    transpose_entries: bool = False,
) -> dict[str, Any]:
    """LayerReport trap fields from precomputed eigenvalues of W and of its randomization.

    ``evals`` / ``rand_evals`` are the (pooled) eigenvalues of W^T W and of the
    randomized matrix's, in the same units (same ``scale``). ``W`` (the matrix or
    (S, N, M) stack, or None) is only read to locate the offending entries when there
    are traps. Returns ``num_traps``, ``rand_distance``, ``rand_lambda_max``,
    ``rand_lambda_plus`` and ``trap_entries`` (text, "" when none).
    """
    ev = _as_numpy(evals)
    rev = _as_numpy(rand_evals)
    N, M = max(int(N), int(M)), min(int(N), int(M))
    if not (np.isfinite(rev).all() and np.isfinite(ev).all()) or rev.size == 0:
        return {
            "num_traps": -1,
            "rand_distance": NAN,
            "rand_lambda_max": NAN,
            "rand_lambda_plus": NAN,
            "trap_entries": "",
        }
    num, rmax, rplus, _, _ = _rand_fit(np.clip(rev, 0.0, None), N, M, tw_margin)
    entries: tuple[TrapEntry, ...] = ()
    if num > 0 and W is not None:
        entries = largest_entries(W, min(top_k, num), transpose=transpose_entries)
    return {
        "num_traps": int(num),
        "rand_distance": esd_distance(ev, rev),
        "rand_lambda_max": rmax,
        "rand_lambda_plus": rplus,
        "trap_entries": format_entries(entries),
    }


# ------------------------------------------------------------------------------- public API


def correlation_traps(
    W: Any,
    *,
    seed: int = 0,
    top_k: int = DEFAULT_TOP_K,
    tw_margin: float = DEFAULT_TW_MARGIN,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    method: Method = "auto",
    scale: float = 1.0,
    keep_evals: bool = False,
) -> TrapResult:
    """The correlation-trap test of one matrix (module docstring for every definition).

    Parameters
    ----------
    W:
        A matrix in any orientation (numpy or torch, any float dtype and device) or an
        (S, N, M) stack of slices pooled into one ESD.
    seed:
        Seed of the element-wise permutation.
    top_k:
        At most this many offending entries are returned.
    tw_margin:
        Traps are randomized eigenvalues beyond ``lambda_plus_rand + tw_margin * s_TW``.
    dtype, device, method, scale:
        As in :func:`esdwatch.engine.spectrum.eigenvalues`; W and its randomization are
        decomposed in one batched call.
    keep_evals:
        Keep the randomized eigenvalues on the result.
    """
    W = torch.as_tensor(W)
    if W.ndim not in (2, 3):
        raise ValueError(f"correlation_traps needs a 2-D matrix or an (S, N, M) stack, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        W = W.to(torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("correlation_traps: W has NaN or Inf entries")
    N, M = int(max(W.shape[-2:])), int(min(W.shape[-2:]))
    R = randomize_matrix(W, seed)
    ev, rev = batch_eigenvalues([W, R], dtype=dtype, device=device, method=method, scales=[scale, scale])
    ev_np, rev_np = _as_numpy(ev), np.clip(_as_numpy(rev), 0.0, None)
    num, rmax, rplus, rs2, rs = _rand_fit(rev_np, N, M, tw_margin)
    entries = largest_entries(W, min(top_k, num)) if num > 0 else ()
    return TrapResult(
        num_traps=int(num),
        rand_distance=esd_distance(ev_np, rev_np),
        rand_lambda_max=rmax,
        rand_lambda_plus=rplus,
        rand_sigma2=rs2,
        rand_tw_scale=rs,
        lambda_max=float(ev_np.max()) if ev_np.size else NAN,
        entries=entries,
        seed=int(seed),
        rand_evals=rev_np if keep_evals else None,
    )


def trap_fields(mat: LayerMatrix, report: Any, config: Any) -> dict[str, Any]:
    """Trap fields of one :class:`~esdwatch.engine.layers.LayerMatrix` for the analyzer.

    Uses ``report.evals`` when the report kept them; otherwise W and its randomization
    are decomposed together in one batched call (so the original spectrum is computed
    a second time: the engine's batched path, with :func:`trap_fields_from_evals`,
    avoids that). ``config`` supplies ``seed``, ``dtype``, ``device``, ``method`` and
    ``tw_margin`` (an AnalysisConfig).
    """
    W = mat.weight
    seed = int(getattr(config, "seed", 0))
    dtype = getattr(config, "dtype", torch.float64)
    device = getattr(config, "device", None)
    method = cast(Method, getattr(config, "method", "auto"))
    tw_margin = getattr(config, "tw_margin", None)
    tw_margin = DEFAULT_TW_MARGIN if tw_margin is None else float(tw_margin)
    R = randomize_matrix(W, seed)
    evals = getattr(report, "evals", None)
    if evals is None:
        evals, rand_evals = batch_eigenvalues([W, R], dtype=dtype, device=device, method=method, scales=[mat.scale] * 2)
    else:
        rand_evals = batch_eigenvalues([R], dtype=dtype, device=device, method=method, scales=[mat.scale])[0]
    return trap_fields_from_evals(
        W,
        evals,
        rand_evals,
        mat.N,
        mat.M,
        tw_margin=tw_margin,
        transpose_entries=mat.stored_transposed,
    )
