"""A hung analysis never hangs training: every wait on the worker is bounded (issue 14, item 4).

The analysis function really hangs (it blocks on an event the test releases at the end),
in a plain loop and under a real Lightning Trainer, with ``on_backpressure="block"`` and
the default ``"skip"``; the bound is ``drain_timeout``. Past it, training goes on (or
ends) with one warning naming the stuck snapshot's step and layers, and the records
analysed before are kept.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from torch import nn

import _lightning_helpers as H
from esdwatch.engine.analyzer import analyze_layers
from esdwatch.monitor import Monitor
from esdwatch.rundir import read_records

OPTS = dict(min_evals=8, traps=False, max_pending=1)  # one snapshot in flight: the hang blocks the next
#: generous upper bounds: a hang would take forever, a bounded wait takes about drain_timeout per wait
HANG_GUARD_S = 60.0

_release = threading.Event()


@pytest.fixture(autouse=True)
def _release_hung_threads():
    _release.clear()
    yield
    _release.set()  # let the daemon threads finish


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _hang_after(n_ok: int):
    calls = {"n": 0}

    def analyze(mats, config):
        calls["n"] += 1
        if calls["n"] > n_ok:
            _release.wait()
        return analyze_layers(mats, config)

    return analyze


@pytest.mark.parametrize("backpressure", ["block", "skip"])
def test_a_hung_analysis_costs_one_bounded_wait_and_training_goes_on(tmp_path, caplog, backpressure):
    mon = Monitor(
        _mlp(),
        every_n_steps=2,
        log_dir=tmp_path,
        analyze_fn=_hang_after(2),
        drain_timeout=1.0,
        on_backpressure=backpressure,
        **OPTS,
    )
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        for step in range(1, 21):
            mon.step(step)
            if step <= 4:
                mon.drain()  # the first two snapshots (steps 2 and 4) are analysed and written
        mon.close()
    elapsed = time.monotonic() - t0
    assert elapsed < HANG_GUARD_S
    # one bounded wait at most for the stuck snapshot, whatever the number of later snapshots
    messages = [r.getMessage() for r in caplog.records]
    stuck = [m for m in messages if "the analysis of the snapshot at step 6 (layers 0, 2)" in m]
    assert stuck, messages
    # the records analysed before the hang are kept
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [2, 4]
    # every later scheduled snapshot is skipped and counted, not lost silently
    assert mon.stats["skipped"] == len(mon.skipped_steps) >= 7
    assert mon.stats["snapshots"] == 3


def test_close_returns_within_the_bound_when_the_final_snapshot_would_wait(tmp_path, caplog):
    mon = Monitor(_mlp(), every_n_steps=5, log_dir=tmp_path, analyze_fn=_hang_after(0), drain_timeout=1.0, **OPTS)
    for step in range(1, 8):
        mon.step(step)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        mon.close()  # at_end: step 7 needs the slot the hung step-5 analysis holds
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert any("snapshot at step 5" in r.getMessage() and "drain_timeout" in r.getMessage() for r in caplog.records)
    assert mon.skipped_steps == [7]


def test_a_trainer_with_a_hung_analysis_finishes(tmp_path, caplog):
    from esdwatch.lightning import ESDMonitor

    cb = ESDMonitor(every_n_steps=4, on_backpressure="block", analyze_fn=_hang_after(1), drain_timeout=1.0, **OPTS)
    trainer = H.trainer(tmp_path, [cb], max_steps=24)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        trainer.fit(H.net())
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert trainer.global_step == 24
    assert any("snapshot at step 8 (layers net.0, net.2)" in r.getMessage() for r in caplog.records)
    assert sorted({r.global_step for r in read_records(tmp_path / "esdwatch")}) == [4]
