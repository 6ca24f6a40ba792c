"""Eigenvalues of layer correlation matrices, computed in torch on the weights' device.

For a weight matrix W (N x M, N >= M) the empirical spectral density (ESD) is built on
the M eigenvalues lambda_i = nu_i^2 of the correlation matrix X = W^T W, nu_i being the
singular values of W. Only these M eigenvalues are meaningful; the N - M structural
zeros of W W^T are never produced here.

Two numerical routes give the same lambda_i:

* ``"gram"``: form the M x M Gram matrix W^T W and call ``torch.linalg.eigvalsh``,
  several times faster than an SVD (docs/metrics.md section 4). In float64 the error on every
  eigenvalue is about eps64 * lambda_max ~ 1e-16 lambda_max, far below anything a
  power-law fit or a norm metric can see.
* ``"svd"``: ``torch.linalg.svdvals`` and square. Forming the Gram matrix squares the
  condition number, which float32 cannot afford (~1e-4 relative error on the bulk), so
  float32 requests go through the SVD.

* ``"mixed"``: the Gram route with the product W^T W formed in float32 (``ssyrk``, from
  float32 weights read in place: no float64 copy of W, a quarter of the float64
  product's time) and its eigenvalues taken in float64 (a float32 ``eigvalsh`` would
  lose ~2e-5 relative on the top eigenvalues themselves). The product's rounding moves
  each eigenvalue by up to ~2e-6 lambda_max (measured), so the top of the spectrum and
  everything computed from it (alpha, x_min, D, the norms, stable rank, entropy, the trap
  count, the rank-collapse count at 1e-6 lambda_max) agree with the float64 Gram's to
  ~1e-6 relative, while quantities that resolve eigenvalues near zero (lambda_min,
  zero_gap, an MP fit whose bulk reaches zero) would not
  (experiments/results/precision.md lists each metric's error). Hence the guard: a
  spectrum whose smallest eigenvalue lies below :data:`MIXED_ZERO_FLOOR` lambda_max is
  recomputed with the float64 product, so every spectrum this route returns is either
  far from zero or the float64 one. ``spectrum="auto"`` takes it for matrices with
  N >= 2M (:data:`esdwatch.engine.tail.AUTO_MIXED_MIN_Q`), where the product dominates
  the cost and the MP bulk stays away from zero. On a GPU the product stays float64: a
  float32 matmul there may run in TF32 (a process-wide setting of the user's, ~1e-3
  relative), and the float64 product is cheap.

``method="auto"`` picks ``gram`` in float64 and ``svd`` in float32.

Two backends carry out the Gram route:

* ``"torch"``: same-shape matrices are stacked and decomposed in one batched
  ``W^T W`` + ``eigvalsh`` call on the weights' device. This is the path on the GPU.
* ``"blas"`` (CPU, float64 Gram route only): each matrix is cast to float64 by numpy
  (reading the torch storage in place), its Gram matrix W^T W formed as a *symmetric
  rank-k update* (numpy's matmul dispatches ``A.T @ A`` to BLAS ``dsyrk``, which computes
  one triangle: half the flops of the general product torch uses, as torch exposes no
  syrk) and its eigenvalues taken by ``torch.linalg.eigvalsh`` on that array (no copy).
  With T = ``torch.get_num_threads()`` above 1, T Python threads take whole matrices,
  largest first, each with single-threaded kernels: a model's many small eigenproblems
  (mostly memory-bound BLAS-2 work) scale far better across matrices than inside one.
  Every kernel on this path releases the GIL (LAPACK through scipy does not, so it is
  not used: a monitor's worker thread must never hold the training thread's
  interpreter for milliseconds). numpy's casts also avoid the fresh buffer torch
  allocates and faults in for each cast. Results agree with the torch backend to
  rounding (1e-15 relative); timings against the torch backend are in
  ``experiments/results/engine_design_notes.md``. The BLAS pool is capped at the caller's
  torch thread count while it runs (``esdwatch.engine.threads``, through ``threadpoolctl``), so
  a monitor's worker thread capped at one thread stays at one thread; without
  ``threadpoolctl`` installed, ``"auto"`` keeps torch.

``backend="auto"`` picks ``"blas"`` for float64 Gram work on the CPU and ``"torch"``
otherwise.

An entry of a batch may be a :class:`DeferredMatrix`: a recipe (e.g. the trap test's
randomization of a weight) that the backend runs where it decomposes the matrix, so
that on the BLAS backend the recipes also run in parallel and each product is freed as
soon as its eigenvalues are known.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from esdwatch.engine.threads import blas_control_available, parallel_map

Method = Literal["auto", "gram", "svd", "mixed"]
Route = Literal["gram", "svd", "mixed"]
Backend = Literal["auto", "torch", "blas"]

#: On the ``"mixed"`` route, a spectrum with an eigenvalue below this share of lambda_max
#: is recomputed with the float64 product: the float32 product's rounding (up to ~2e-6
#: lambda_max measured) would show there (module docstring).
MIXED_ZERO_FLOOR = 1e-4

__all__ = [
    "eigenvalues",
    "batch_eigenvalues",
    "iter_eigenvalues",
    "resolve_method",
    "resolve_backend",
    "DeferredMatrix",
]


@dataclass(frozen=True)
class DeferredMatrix:
    """A matrix to be built from ``source`` (same shape and device) when it is decomposed.

    ``make(source)`` returns the matrix, e.g. ``lambda W: randomize_matrix(W, seed)``.
    """

    source: torch.Tensor
    make: Callable[[torch.Tensor], torch.Tensor]

    def materialize(self) -> torch.Tensor:
        return self.make(self.source)


MatrixLike = torch.Tensor | DeferredMatrix


def resolve_method(method: Method, dtype: torch.dtype) -> Route:
    """The concrete route for ``method`` at compute precision ``dtype`` (see module doc)."""
    if method == "auto":
        return "gram" if dtype == torch.float64 else "svd"
    if method not in ("gram", "svd", "mixed"):
        raise ValueError(f"method must be 'auto', 'gram', 'svd' or 'mixed', got {method!r}")
    if method == "mixed" and dtype != torch.float64:
        raise ValueError("method='mixed' takes the eigenvalues in float64: use dtype=torch.float64")
    return method


def resolve_backend(backend: Backend, route: str, dtype: torch.dtype, device: torch.device) -> Literal["torch", "blas"]:
    """The concrete backend for Gram/SVD ``route`` at ``dtype`` on ``device`` (module doc)."""
    if backend not in ("auto", "torch", "blas"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'blas', got {backend!r}")
    eligible = route in ("gram", "mixed") and dtype == torch.float64 and device.type == "cpu"
    if backend == "blas":
        if not eligible:
            raise ValueError("backend='blas' computes float64 Gram eigenvalues on the CPU only")
        return "blas"
    if backend == "auto" and eligible and blas_control_available():
        return "blas"
    return "torch"


def _blas_gram_eigenvalues(entry: MatrixLike, scale: float, route: Route = "gram") -> torch.Tensor:
    """Pooled ascending float64 eigenvalues of the Gram matrices of a CPU entry (see module doc).

    The entry is a matrix (N, M) in any orientation or a stack (S, N, M); each slice is
    cast to float64 (float32 on the ``"mixed"`` route) by numpy, its Gram matrix formed by
    ``dsyrk`` / ``ssyrk`` (``A.T @ A`` or ``A @ A.T``, whichever is M x M), cast to float64
    and decomposed by ``torch.linalg.eigvalsh``; ``scale`` is applied to the Gram (scale^2).
    """
    W = entry.materialize() if isinstance(entry, DeferredMatrix) else entry
    stack = W.detach().reshape(-1, W.shape[-2], W.shape[-1])
    if stack.dtype not in (torch.float32, torch.float64):
        stack = stack.to(torch.float64)  # numpy has no bfloat16
    out = []
    for piece in stack:
        evals = _blas_piece_eigenvalues(piece, scale, np.float32 if route == "mixed" else np.float64)
        if route == "mixed" and _near_zero(evals):
            evals = _blas_piece_eigenvalues(piece, scale, np.float64)
        out.append(evals)
    evals = out[0] if len(out) == 1 else torch.cat(out).sort().values
    return evals.clamp_min_(0.0)


def _blas_piece_eigenvalues(piece: torch.Tensor, scale: float, product_dtype: type) -> torch.Tensor:
    a: np.ndarray = piece.numpy().astype(product_dtype, order="K", copy=False)
    gram = (a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T).astype(np.float64, copy=False)
    if scale != 1.0:
        gram *= scale * scale
    return torch.linalg.eigvalsh(torch.from_numpy(gram))


def _near_zero(evals: torch.Tensor) -> bool:
    """Whether a mixed-route spectrum reaches below :data:`MIXED_ZERO_FLOOR` lambda_max."""
    return bool(evals.numel()) and bool(evals.min() < MIXED_ZERO_FLOOR * evals.max())


def _oriented(W: torch.Tensor) -> torch.Tensor:
    """View of W (..., N, M) with N >= M, transposing the last two axes if needed."""
    if W.ndim < 2:
        raise ValueError(f"expected a matrix or a stack of matrices, got shape {tuple(W.shape)}")
    if W.shape[-2] < W.shape[-1]:
        return W.transpose(-2, -1)
    return W


def _eig_stack(W: torch.Tensor, route: str) -> torch.Tensor:
    """Ascending eigenvalues of W^T W for a stack W of shape (B, N, M), N >= M."""
    if route in ("gram", "mixed"):  # a "mixed" stack arrives in float32
        gram = W.transpose(-2, -1) @ W
        evals = torch.linalg.eigvalsh(gram.to(torch.float64))
        if route == "mixed" and W.dtype == torch.float32 and _near_zero(evals):  # its guard (module doc)
            W64 = W.to(torch.float64)
            evals = torch.linalg.eigvalsh(W64.transpose(-2, -1) @ W64)
    else:
        evals = torch.linalg.svdvals(W).square().flip(-1)
    # eigvalsh of a PSD matrix can return -eps * lambda_max for true zeros
    return evals.clamp_min_(0.0)


def eigenvalues(
    W: MatrixLike,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    method: Method = "auto",
    scale: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Eigenvalues lambda_i = (scale * nu_i)^2 of one matrix or a stack of slices.

    Parameters
    ----------
    W:
        A matrix (N, M) or a stack (S, N, M) in any orientation, dtype, device or
        memory layout (float16/bfloat16, non-contiguous and CUDA tensors are fine).
    dtype:
        Compute precision, float64 by default; float32 is an opt-in speed trade.
    device:
        Where to compute; defaults to W's own device (CUDA weights stay on the GPU).
    method:
        ``"auto"``, ``"gram"``, ``"svd"`` or ``"mixed"`` (see module docstring).
    scale:
        Multiplies W before the decomposition (weightwatcher's conv2d normalization).
    backend:
        ``"auto"``, ``"torch"`` or ``"blas"`` (see module docstring).

    Returns
    -------
    A 1-D ascending tensor of the M eigenvalues (pooled and sorted over the S slices of a
    stack, S * M in all), on ``device``, in ``dtype``.
    """
    return batch_eigenvalues([W], dtype=dtype, device=device, method=method, scales=[scale], backend=backend)[0]


def batch_eigenvalues(
    mats: Sequence[MatrixLike],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    method: Method = "auto",
    scales: Sequence[float] | None = None,
    backend: Backend = "auto",
) -> list[torch.Tensor]:
    """Eigenvalues of many matrices, one batched decomposition per distinct shape.

    Each entry of ``mats`` is a matrix (N, M) or a stack of slices (S, N, M) whose
    eigenvalues are pooled into one ESD, or a :class:`DeferredMatrix`. On the torch
    backend, matrices of the same oriented shape and device are stacked into a single
    ``eigvalsh``/``svdvals`` call; on the BLAS backend each goes through ``dsyrk`` +
    ``eigvalsh`` on its own, spread over the caller's torch thread count (module
    docstring). Returns, in input order, 1-D ascending tensors as :func:`eigenvalues` does.
    """
    out: list[torch.Tensor | None] = [None] * len(mats)
    for i, evals in iter_eigenvalues(mats, dtype=dtype, device=device, method=method, scales=scales, backend=backend):
        out[i] = evals
    return out  # type: ignore[return-value]  # every index was filled: no None left


def iter_eigenvalues(
    mats: Sequence[MatrixLike],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    method: Method = "auto",
    scales: Sequence[float] | None = None,
    backend: Backend = "auto",
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`batch_eigenvalues` as ``(index, eigenvalues)`` pairs, each as soon as it is known.

    BLAS-backend results come in completion order, then torch-backend results group by
    group. Argument errors are raised at the first iteration, before any work starts.
    (Consuming results while the pool still runs costs the pool the GIL at each of its
    kernel boundaries: the analyzer collects every spectrum before it fits any.)
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be torch.float32 or torch.float64, got {dtype}")
    route = resolve_method(method, dtype)
    if scales is None:
        scales = [1.0] * len(mats)
    if len(scales) != len(mats):
        raise ValueError("scales must have one entry per matrix")

    # (index, stack) per input, grouped by what can share one batched torch call
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    blas: list[tuple[int, MatrixLike, float]] = []
    torch_items: list[tuple[int, MatrixLike, float, torch.device]] = []
    for i, (W, scale) in enumerate(zip(mats, scales)):
        source = W.source if isinstance(W, DeferredMatrix) else W
        _oriented(source)  # shape check, before any work
        target = torch.device(device) if device is not None else source.device
        if resolve_backend(backend, route, dtype, target) == "blas":
            if source.device != target:  # e.g. CUDA weights analysed with device="cpu"
                W = (W.materialize() if isinstance(W, DeferredMatrix) else W).to(target)
            blas.append((i, W, scale))
        else:
            torch_items.append((i, W, scale, target))

    if blas:
        yield from _run_blas(blas, route)
    for i, W, scale, target in torch_items:
        if isinstance(W, DeferredMatrix):
            W = W.materialize()
        stack = _oriented(W)
        # off the CPU a float32 matmul may run in TF32 (torch.backends.cuda.matmul.allow_tf32, a
        # process-wide setting of the user's): ~1e-3 relative, so the product stays float64 there
        product_dtype = torch.float32 if route == "mixed" and target.type == "cpu" else dtype
        stack = stack.reshape(-1, stack.shape[-2], stack.shape[-1]).to(device=target, dtype=product_dtype)
        if scale != 1.0:
            stack = stack * scale
        groups[(tuple(stack.shape[-2:]), str(target))].append((i, stack))
    for members in groups.values():
        stacked = members[0][1] if len(members) == 1 else torch.cat([s for _, s in members], dim=0)
        evals = _eig_stack(stacked, route)
        start = 0
        for i, stack in members:
            part = evals[start : start + stack.shape[0]]
            start += stack.shape[0]
            yield i, (part.reshape(-1).sort().values if part.shape[0] > 1 else part.reshape(-1))


def _cost(entry: MatrixLike) -> int:
    """Flops-like size of an entry's Gram + eigenproblem, N M^2 + M^3 per slice."""
    shape = (entry.source if isinstance(entry, DeferredMatrix) else entry).shape
    n, m = max(shape[-2:]), min(shape[-2:])
    slices = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return slices * (n * m * m + m**3)


def _run_blas(items: list[tuple[int, MatrixLike, float]], route: Route) -> Iterator[tuple[int, torch.Tensor]]:
    """Eigenvalues of BLAS-backend items ``(index, entry, scale)``, as ``(index, evals)``.

    Spread over the caller's torch thread count by :func:`esdwatch.engine.threads.parallel_map`,
    largest matrices first (module docstring).
    """
    work = [(entry, scale) for _, entry, scale in items]
    for k, evals in parallel_map(
        lambda it: _blas_gram_eigenvalues(it[0], it[1], route), work, cost=lambda it: _cost(it[0])
    ):
        yield items[k][0], evals
