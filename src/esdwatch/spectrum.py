"""Eigenvalues of layer correlation matrices, computed in torch on the weights' device.

For a weight matrix W (N x M, N >= M) the empirical spectral density (ESD) is built on
the M eigenvalues lambda_i = nu_i^2 of the correlation matrix X = W^T W, nu_i being the
singular values of W. Only these M eigenvalues are meaningful; the N - M structural
zeros of W W^T are never produced here.

Two numerical routes give the same lambda_i:

* ``"gram"``: form the M x M Gram matrix W^T W and call ``torch.linalg.eigvalsh``.
  4-10x faster than an SVD (HTSR.md section 4). In float64 the error on every
  eigenvalue is about eps64 * lambda_max ~ 1e-16 lambda_max, far below anything a
  power-law fit or a norm metric can see.
* ``"svd"``: ``torch.linalg.svdvals`` and square. Forming the Gram matrix squares the
  condition number, which float32 cannot afford (~1e-4 relative error on the bulk), so
  float32 requests go through the SVD.

``method="auto"`` picks ``gram`` in float64 and ``svd`` in float32.

Two backends carry out the Gram route:

* ``"torch"``: same-shape matrices are stacked and decomposed in one batched
  ``W^T W`` + ``eigvalsh`` call on the weights' device. This is the path on the GPU.
* ``"blas"`` (CPU, float64 Gram route only): each matrix goes through numpy/scipy's BLAS
  and LAPACK: W^T W as a *symmetric rank-k update* (numpy's matmul dispatches ``A.T @ A``
  to ``dsyrk``, which computes one triangle: half the flops of the general matrix product
  torch uses, as torch exposes no syrk) and ``dsyevr`` for the eigenvalues of Gram
  matrices up to ``LAPACK_EIGVALSH_MAX_M`` (torch's ``eigvalsh`` above). Measured on
  the 2-core CPU this project is benchmarked on (one thread, all-MiniLM-L6-v2's 39
  matrices): Gram 0.40 s with torch versus 0.2 s, eigenvalues 0.35 s versus 0.27 s,
  float32 -> float64 casts 0.17 s versus 0.02 s (torch allocates and faults in a fresh
  buffer each time). Results agree with the torch backend to rounding (1e-15 relative).
  The BLAS thread pool is capped at ``torch.get_num_threads()`` of the calling thread
  while it runs (through ``threadpoolctl``), so a monitor's worker thread capped at one
  thread stays at one thread. Without ``threadpoolctl`` installed, ``"auto"`` keeps torch.

``backend="auto"`` picks ``"blas"`` for float64 Gram work on the CPU and ``"torch"``
otherwise.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Literal, Sequence

import numpy as np
import torch

Method = Literal["auto", "gram", "svd"]
Backend = Literal["auto", "torch", "blas"]

__all__ = ["eigenvalues", "batch_eigenvalues", "resolve_method"]

_BLAS_CONTROLLER: object | None = None
_BLAS_LOCK = threading.Lock()


def resolve_method(method: Method, dtype: torch.dtype) -> Literal["gram", "svd"]:
    """The concrete route for ``method`` at compute precision ``dtype`` (see module doc)."""
    if method == "auto":
        return "gram" if dtype == torch.float64 else "svd"
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'auto', 'gram' or 'svd', got {method!r}")
    return method


def _blas_controller():
    """A cached ``threadpoolctl.ThreadpoolController`` (None when threadpoolctl is absent)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            import scipy.linalg  # noqa: F401 - load scipy's own BLAS before the controller scans
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER or None


def resolve_backend(backend: Backend, route: str, dtype: torch.dtype, device: torch.device) -> Literal["torch", "blas"]:
    """The concrete backend for Gram/SVD ``route`` at ``dtype`` on ``device`` (module doc)."""
    if backend not in ("auto", "torch", "blas"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'blas', got {backend!r}")
    eligible = route == "gram" and dtype == torch.float64 and device.type == "cpu"
    if backend == "blas":
        if not eligible:
            raise ValueError("backend='blas' computes float64 Gram eigenvalues on the CPU only")
        return "blas"
    if backend == "auto" and eligible and _blas_controller() is not None:
        return "blas"
    return "torch"


#: Largest Gram size sent to LAPACK ``dsyevr`` (numpy/scipy's OpenBLAS build); larger
#: ones go to ``torch.linalg.eigvalsh`` (MKL ``syevd``, whose blocked tridiagonalization
#: wins on big matrices). Measured on one core of the benchmark CPU: dsyevr 7 ms versus
#: 10 ms at M = 384 and 106 versus 141 ms at 1024, even at 1536, and 6.9 s versus 4.4 s at 4096.
LAPACK_EIGVALSH_MAX_M = 1536


def _blas_gram_eigenvalues(stack: torch.Tensor, scale: float) -> torch.Tensor:
    """Pooled ascending eigenvalues of the Gram matrices of a CPU stack (S, N, M), float64.

    Each slice is cast to float64 in numpy (a strided view of the torch storage, no copy
    before the cast), its Gram matrix formed by ``dsyrk`` (numpy's ``A.T @ A``) and its
    eigenvalues taken by LAPACK ``dsyevr`` (or torch's ``eigvalsh`` above
    ``LAPACK_EIGVALSH_MAX_M``); ``scale`` is applied to the Gram (scale^2).
    """
    from scipy.linalg import lapack

    if stack.dtype not in (torch.float32, torch.float64):
        stack = stack.to(torch.float64)  # numpy has no bfloat16
    out = []
    for W in stack.detach():
        a = W.numpy().astype(np.float64, order="K", copy=False)
        gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
        if scale != 1.0:
            gram *= scale * scale
        if gram.shape[0] > LAPACK_EIGVALSH_MAX_M:
            out.append(torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy())
            continue
        w, *_, info = lapack.dsyevr(gram, compute_v=0, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dsyevr failed to converge (info={info})")
        out.append(w[: gram.shape[0]])
    evals = out[0] if len(out) == 1 else np.sort(np.concatenate(out))
    return torch.from_numpy(np.clip(evals, 0.0, None))


def _oriented(W: torch.Tensor) -> torch.Tensor:
    """View of W (..., N, M) with N >= M, transposing the last two axes if needed."""
    if W.ndim < 2:
        raise ValueError(f"expected a matrix or a stack of matrices, got shape {tuple(W.shape)}")
    if W.shape[-2] < W.shape[-1]:
        return W.transpose(-2, -1)
    return W


def _eig_stack(W: torch.Tensor, route: str) -> torch.Tensor:
    """Ascending eigenvalues of W^T W for a stack W of shape (B, N, M), N >= M."""
    if route == "gram":
        gram = W.transpose(-2, -1) @ W
        evals = torch.linalg.eigvalsh(gram)
    else:
        evals = torch.linalg.svdvals(W).square().flip(-1)
    # eigvalsh of a PSD matrix can return -eps * lambda_max for true zeros
    return evals.clamp_min_(0.0)


def eigenvalues(
    W: torch.Tensor,
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
        ``"auto"``, ``"gram"`` or ``"svd"`` (see module docstring).
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
    mats: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    method: Method = "auto",
    scales: Sequence[float] | None = None,
    backend: Backend = "auto",
) -> list[torch.Tensor]:
    """Eigenvalues of many matrices, one batched decomposition per distinct shape.

    Each entry of ``mats`` is a matrix (N, M) or a stack of slices (S, N, M) whose
    eigenvalues are pooled into one ESD. On the torch backend, matrices of the same
    oriented shape and device are stacked into a single ``eigvalsh``/``svdvals`` call; on
    the BLAS backend each goes through ``dsyrk`` + ``dsyevr`` in turn (module docstring). Returns, in input
    order, 1-D ascending tensors as :func:`eigenvalues` does.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be torch.float32 or torch.float64, got {dtype}")
    route = resolve_method(method, dtype)
    if scales is None:
        scales = [1.0] * len(mats)
    if len(scales) != len(mats):
        raise ValueError("scales must have one entry per matrix")

    out: list[torch.Tensor | None] = [None] * len(mats)
    # (index, stack) per input, grouped by what can share one batched torch call
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    blas: list[tuple[int, torch.Tensor, float]] = []
    for i, (W, scale) in enumerate(zip(mats, scales)):
        target = torch.device(device) if device is not None else W.device
        stack = _oriented(W)
        stack = stack.reshape(-1, stack.shape[-2], stack.shape[-1])
        if resolve_backend(backend, route, dtype, target) == "blas":
            blas.append((i, stack.to(device=target), scale))
            continue
        stack = stack.to(device=target, dtype=dtype)
        if scale != 1.0:
            stack = stack * scale
        groups[(tuple(stack.shape[-2:]), str(target))].append((i, stack))

    if blas:
        for i, evals in _run_blas(blas):
            out[i] = evals
    for members in groups.values():
        stacked = members[0][1] if len(members) == 1 else torch.cat([s for _, s in members], dim=0)
        evals = _eig_stack(stacked, route)
        start = 0
        for i, stack in members:
            part = evals[start : start + stack.shape[0]]
            start += stack.shape[0]
            out[i] = part.reshape(-1).sort().values if part.shape[0] > 1 else part.reshape(-1)
    return out  # type: ignore[return-value]


def _run_blas(items: list[tuple[int, torch.Tensor, float]]) -> list[tuple[int, torch.Tensor]]:
    """Eigenvalues of BLAS-backend items ``(index, stack, scale)``, as ``(index, evals)``.

    With T = ``torch.get_num_threads()`` of the caller above 1 and several matrices, T
    Python threads each take whole matrices (largest first) with a single-threaded BLAS:
    numpy and LAPACK release the GIL, and a model's many small eigenproblems (384 x 384
    takes ~7 ms in ``dsyevr``, mostly BLAS-2 bound) scale far better across matrices
    than inside one. A single matrix, or T = 1, runs on the calling thread with T BLAS threads.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(items) == 1:
        with _blas_threads(threads):
            return [(i, _blas_gram_eigenvalues(stack, scale)) for i, stack, scale in items]
    from concurrent.futures import ThreadPoolExecutor

    # largest first (cost ~ N M^2 + M^3 per slice) so the long ones do not finish last
    order = sorted(items, key=lambda it: -it[1].shape[0] * it[1].shape[-1] ** 2 * sum(it[1].shape[-2:]))
    with _blas_threads(1), ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [(i, pool.submit(_blas_gram_eigenvalues, stack, scale)) for i, stack, scale in order]
        return [(i, f.result()) for i, f in futures]


@contextlib.contextmanager
def _blas_threads(threads: int):
    """Cap numpy/scipy's BLAS pool at ``threads`` while it runs.

    The BLAS pool size is process-wide, so concurrent callers (two monitors' workers)
    take turns: interleaved set/restore pairs would otherwise leave the wrong size behind.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with _BLAS_LOCK, controller.limit(limits=threads, user_api="blas"):
        yield
