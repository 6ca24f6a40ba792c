"""Per-thread caps on torch's OpenMP/MKL pools and numpy's BLAS pool."""

import threading

import pytest
import torch

from esdwatch.engine.threads import blas_control_available, limit_blas_threads, limit_openmp_threads


def _in_thread(fn):
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_cap_holds_in_a_new_thread_after_torch_set_num_threads():
    # torch re-applies the process-wide count at a thread's first parallel kernel;
    # the cap must survive that (it did not, before the cap forced the set-up first)
    torch.set_num_threads(2)

    def capped():
        limit_openmp_threads(1)
        x = torch.randn(300, 300)
        x @ x  # a parallel kernel: the lazy per-thread set-up has run by now
        return torch.get_num_threads()

    assert _in_thread(capped) == 1
    assert torch.get_num_threads() == 2  # the calling thread keeps its count


def test_blas_cap_is_restored_after_the_block():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    assert blas_control_available()

    def counts():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    before = counts()
    with limit_blas_threads(1):
        assert counts() == {1}
    assert counts() == before
