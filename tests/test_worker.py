"""Snapshot buffers and the analysis executors (thread and process), with real tensors."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from torch import nn

from esdwatch.engine.analyzer import AnalysisConfig, analyze_layers
from esdwatch.engine.layers import find_layers
from esdwatch.monitor.snapshot import BufferPool, take_snapshot
from esdwatch.monitor.worker import Job, ProcessExecutor, ThreadExecutor, make_executor, run_analysis

CONFIG = AnalysisConfig(traps=False)
FIELDS = ("alpha", "lambda_max", "stable_rank", "entropy", "log_norm", "mp_softrank", "num_evals", "status")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # 2 shared cores: intra-op OpenMP spinning against other processes costs 10-30x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 60),  # stored (60, 40): N=60 >= M=40, no transpose
        nn.ReLU(),
        nn.Linear(60, 30),  # stored (30, 60): a transposed view
        nn.Conv2d(12, 16, 3),  # pooled: a permuted (9, 16, 12) view
    )


def _numbers(reports):
    return [(r.name,) + tuple(getattr(r, f) for f in FIELDS) for r in reports]


def test_snapshot_copies_are_private_reused_and_keep_layout():
    model = _model()
    mats, _ = find_layers(model, min_evals=8)
    assert [m.name for m in mats] == ["0", "2", "3"]
    pool = BufferPool(slots=1, target="cpu")
    snap = take_snapshot(mats, pool)
    assert snap is not None and snap.slot == 0
    for live, copy in zip(mats, snap.mats):
        assert copy.name == live.name and copy.scale == live.scale
        assert copy.weight.shape == live.weight.shape and copy.weight.dtype == live.weight.dtype
        assert torch.equal(copy.weight, live.weight)
        assert copy.weight.stride() == live.weight.stride()  # dense layouts copied as they are
        assert copy.weight.data_ptr() != live.weight.data_ptr()
    # the transposed Linear and the permuted conv kernel are copied in their own layout
    assert snap.mats[1].weight.transpose(-2, -1).is_contiguous()
    assert snap.nbytes == sum(m.weight.numel() * 4 for m in mats)
    before = [m.weight.clone() for m in snap.mats]

    with torch.no_grad():  # training moves on: the copies must not
        for p in model.parameters():
            p.add_(1.0)
    for b, copy in zip(before, snap.mats):
        assert torch.equal(b, copy.weight)

    # one slot: a second snapshot while the first is in flight gets nothing
    assert take_snapshot(mats, pool) is None
    pool.release(snap.slot)
    ptrs = [m.weight.data_ptr() for m in snap.mats]
    allocations = pool.allocations
    snap2 = take_snapshot(find_layers(model, min_evals=8)[0], pool)
    assert [m.weight.data_ptr() for m in snap2.mats] == ptrs  # buffers reused
    assert pool.allocations == allocations == 3
    assert torch.equal(snap2.mats[0].weight[0], model[0].weight)


def test_snapshot_follows_replaced_and_removed_layers():
    model = _model()
    pool = BufferPool(slots=1)
    snap = take_snapshot(find_layers(model, min_evals=8)[0], pool)
    pool.release(snap.slot)
    model[2] = nn.Linear(60, 20)  # replaced, new shape
    model[3] = nn.Identity()  # removed
    snap = take_snapshot(find_layers(model, min_evals=8)[0], pool)
    assert [(m.name, tuple(m.weight.shape)) for m in snap.mats] == [("0", (1, 60, 40)), ("2", (1, 60, 20))]
    assert torch.equal(snap.mats[1].weight[0], model[2].weight.T)
    assert set(pool._slots[0].buffers) == {"0", "2"}  # the removed layer's buffer is freed


def test_shared_target_buffers_live_in_shared_memory():
    pool = BufferPool(slots=2, target="shared")
    snap = take_snapshot(find_layers(_model(), min_evals=8)[0], pool)
    assert all(m.weight.is_shared() for m in snap.mats)
    assert pool.free_slots() == 1


def _fails_on_layer_2(mats, config):
    if any(m.name == "2" for m in mats):
        raise RuntimeError("boom in layer 2")
    return analyze_layers(mats, config)


def test_run_analysis_names_the_failing_layer_and_keeps_the_others():
    mats, _ = find_layers(_model(), min_evals=8)
    reports, job_tb, tbs = run_analysis(mats, CONFIG, _fails_on_layer_2)
    assert [r.name for r in reports] == ["0", "2", "3"]
    assert [r.status for r in reports] == ["ok", "failed", "ok"]
    assert reports[1].status_detail == "RuntimeError: boom in layer 2"
    assert "boom in layer 2" in job_tb and set(tbs) == {"2"}
    expected = analyze_layers(mats, CONFIG)
    assert _numbers([reports[0], reports[2]]) == _numbers([expected[0], expected[2]])


def _jobs(mats, n=2):
    return [Job(seq=i, step=10 * i, epoch=0, wall_time=1000.0 + i, mats=list(mats), config=CONFIG) for i in range(n)]


def test_thread_executor_results_in_order_at_low_priority():
    mats, _ = find_layers(_model(), min_evals=8)
    expected = _numbers(analyze_layers(mats, CONFIG))
    main_nice = os.nice(0)
    ex = ThreadExecutor(nice=3, threads=1)
    try:
        for job in _jobs(mats, 3):
            ex.submit(job)
        assert ex.in_flight == 3
        results = ex.drain(timeout=120)
    finally:
        ex.close()
    assert ex.in_flight == 0
    assert [r.seq for r in results] == [0, 1, 2]
    assert [r.step for r in results] == [0, 10, 20] and results[1].wall_time == 1001.0
    for r in results:
        assert _numbers(r.reports) == expected and r.error is None
        assert r.cpu_s >= 0 and r.wall_s > 0
    info = results[0].worker
    assert info["pid"] == os.getpid() and info["tid"] != threading.get_native_id()
    assert info["nice"] == main_nice + 3 and info["threads"] == 1
    assert os.nice(0) == main_nice and torch.get_num_threads() == 1  # the training thread is untouched


def _sleeps_on_layer_named_sleep(mats, config):
    if mats and mats[0].name == "sleep":
        time.sleep(600)
    return analyze_layers(mats, config)


def test_process_executor_matches_thread_and_survives_a_dead_worker():
    import dataclasses

    mats, _ = find_layers(_model(), min_evals=8)
    expected = _numbers(analyze_layers(mats, CONFIG))
    pool = BufferPool(slots=2, target="shared")
    snap = take_snapshot(mats, pool)
    ex = make_executor("process", _sleeps_on_layer_named_sleep, nice=2, threads=1)
    assert isinstance(ex, ProcessExecutor) and ex.buffer_target == "shared"
    try:
        ex.submit(Job(seq=0, step=5, epoch=1, wall_time=5.0, mats=snap.mats, config=CONFIG, slot=snap.slot))
        (res,) = ex.drain(timeout=180)
        assert res.error is None and (res.step, res.epoch, res.slot) == (5, 1, 0)
        assert _numbers(res.reports) == expected  # same numbers as in-process, through shared memory
        assert res.worker["pid"] != os.getpid() and res.worker["threads"] == 1
        assert res.worker["nice"] == os.nice(0) + 2

        # a worker that dies mid-analysis: the job comes back as an error, the next one restarts it
        sleepy = [dataclasses.replace(snap.mats[0], name="sleep")]
        ex.submit(Job(seq=1, step=10, epoch=1, wall_time=6.0, mats=sleepy, config=CONFIG, slot=1))
        os.kill(ex._proc.pid, signal.SIGKILL)
        ex._proc.join(30)
        lost = ex.drain(timeout=30)
        assert [(r.seq, r.step, r.names) for r in lost] == [(1, 10, ["sleep"])]
        assert "died" in lost[0].error and lost[0].reports == [] and ex.in_flight == 0
        ex.submit(Job(seq=2, step=15, epoch=1, wall_time=7.0, mats=snap.mats, config=CONFIG, slot=0))
        (res,) = ex.drain(timeout=180)
        assert ex.restarts == 1 and _numbers(res.reports) == expected
    finally:
        ex.close()
    assert not ex.alive


def test_make_executor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="worker must be one of"):
        make_executor("fiber")
