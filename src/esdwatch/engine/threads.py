"""Per-thread caps on the native thread pools that torch and numpy kernels use.

Two pools matter when esdwatch runs beside a training loop or spreads its own work over
Python threads:

* OpenMP (torch's intra-op pool, MKL under GNU threading): its thread count is an
  internal control variable of the *calling thread* (``omp_set_num_threads``), so a
  worker thread can run its kernels single-team while the training thread keeps its own
  count. ``torch.set_num_threads`` would change it for the whole process. MKL (torch's
  LAPACK on x86) follows that variable until a global MKL count is set
  (``MKL_NUM_THREADS``, or ``torch.set_num_threads``, which calls ``mkl_set_num_threads``);
  then only MKL's own thread-local count (``mkl_set_num_threads_local``) caps it: without
  it a 1-thread worker's MKL ``syevd`` still runs on the global count
  (experiments/results/engine_design_notes.md).
* BLAS of numpy/scipy (OpenBLAS): one process-wide pool, capped for the duration of a
  call through ``threadpoolctl`` when it is installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "openmp_runtimes",
    "limit_openmp_threads",
    "limit_blas_threads",
    "blas_control_available",
    "parallel_map",
]

_BLAS_CONTROLLER: Any = None
_BLAS_LOCK = threading.RLock()  # re-entrant: a caller may decompose more inside a capped block


def openmp_runtimes() -> list[Any]:
    """Every OpenMP runtime loaded in this process (libgomp / libiomp / libomp), via ctypes.

    torch bundles its own; scikit-learn, numpy builds and others may load more. A cap is
    set in each of them (each is thread-local), so whichever runtime a kernel uses, the
    calling thread runs it with the capped team.
    """
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "omp" in line and ".so" in line}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        if not os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")):
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads  # noqa: B018 - probe the symbol
        except (OSError, AttributeError):
            continue
        libs.append(lib)
    return libs


def _mkl_set_local() -> Any:
    """MKL's ``mkl_set_num_threads_local_`` (Fortran binding: int by reference), or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.mkl_set_num_threads_local_
    except (OSError, AttributeError):
        return None


def limit_openmp_threads(threads: int) -> bool:
    """Cap the calling thread's OpenMP teams and MKL count at ``threads``.

    Thread-local (see module docstring); returns False if no OpenMP runtime was found.
    """
    # torch sets up each thread's pool lazily, at its first parallel kernel, and then
    # re-applies the process-wide count of torch.set_num_threads (OpenMP and MKL): a cap
    # set before that would be silently undone. get_num_threads() runs that set-up now.
    torch.get_num_threads()
    libs = openmp_runtimes()
    for lib in libs:
        lib.omp_set_num_threads(int(threads))
    mkl_local = _mkl_set_local()
    if mkl_local is not None:
        mkl_local(ctypes.byref(ctypes.c_int(int(threads))))
    return bool(libs)


def _blas_controller() -> Any:
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


def blas_control_available() -> bool:
    """Whether numpy/scipy's BLAS pool can be capped (``threadpoolctl`` is installed)."""
    return _blas_controller() is not None


@contextlib.contextmanager
def limit_blas_threads(threads: int) -> Iterator[None]:
    """Cap numpy/scipy's BLAS pool at ``threads`` while the block runs.

    The pool size is process-wide, so concurrent callers (two monitors' workers) take
    turns: interleaved set/restore pairs would otherwise leave the wrong size behind.
    Without threadpoolctl the block runs uncapped.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with _BLAS_LOCK, controller.limit(limits=int(threads), user_api="blas"):
        yield


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    threads: int | None = None,
    cost: Callable[[T], float] | None = None,
) -> Iterator[tuple[int, R]]:
    """``(index, fn(item))`` for every item, as each is done, spread over ``threads`` Python threads.

    For work made of native kernels that release the GIL (torch, numpy BLAS): with
    ``threads`` (default: the caller's ``torch.get_num_threads()``) above 1 and several
    items, each thread takes whole items, costliest first when ``cost`` is given, with
    its OpenMP/MKL teams capped at one thread and numpy's BLAS capped at one for the
    call, so the kernels never oversubscribe the cores. With one thread (a monitor's
    worker capped at one) the items run in turn on the calling thread, its BLAS capped
    at that count. An exception from ``fn`` is raised at its item; items not started
    by then are cancelled.
    """
    n_threads = torch.get_num_threads() if threads is None else int(threads)
    if n_threads <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            with limit_blas_threads(n_threads):
                result = fn(item)
            yield i, result  # outside the cap: the caller's work between items runs uncapped
        return
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else range(len(items))
    with (
        limit_blas_threads(1),
        ThreadPoolExecutor(
            max_workers=min(n_threads, len(items)), initializer=limit_openmp_threads, initargs=(1,)
        ) as pool,
    ):
        futures = {pool.submit(fn, items[i]): i for i in order}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:  # the caller stopped early or an item failed
                future.cancel()
