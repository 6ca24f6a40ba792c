"""Scheduled snapshots are kept by default; past the memory budget they are skipped, counted and listed
(issue 14, item 2).

What is pending (copied, not yet analysed) is bounded by bytes (``max_pending_bytes``,
default a quarter of the available memory, at most 4 GiB), not by a count of one: a worker
that falls behind for a while catches up instead of dropping snapshots. A snapshot that does
not fit is skipped with ``on_backpressure="skip"``, counted in ``stats["skipped"]`` and listed
with its reason in ``skipped_snapshots.jsonl``.
"""

from __future__ import annotations

import json
import threading

import torch
from torch import nn

from esdwatch.engine.analyzer import analyze_layers
from esdwatch.monitor import Monitor
from esdwatch.monitor.runtime import DEFAULT_BUDGET_CAP, default_pending_budget
from esdwatch.rundir import read_records

OPTS = dict(traps=False)


def _three_layer_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))


def _train(model: nn.Module, mon: Monitor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x = torch.randn(32, 64, generator=g)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step)
    mon.close()


def test_the_defaults_keep_every_scheduled_snapshot(tmp_path):
    # a training step takes well under a millisecond, an analysis several: the worker falls behind at
    # once, and the old default (one snapshot in flight, skip) wrote steps 5 and 30 of 5, 10, ..., 30
    model = _three_layer_net()
    mon = Monitor(model, every_n_steps=5, log_dir=tmp_path, **OPTS)
    _train(model, mon, 30)
    steps = sorted({r.global_step for r in read_records(tmp_path)})
    print(f"scheduled 6, written {len(steps)}: {steps}, skipped {mon.stats['skipped']}")
    assert steps == [5, 10, 15, 20, 25, 30]
    assert mon.stats["skipped"] == 0 and mon.stats["snapshots"] == mon.stats["analysed"] == 6
    assert not (tmp_path / "esdwatch" / "skipped_snapshots.jsonl").exists()


class _Gate:
    def __init__(self):
        self.open = threading.Event()

    def __call__(self, mats, config):
        self.open.wait(60)
        return analyze_layers(mats, config)


def test_past_the_budget_a_snapshot_is_skipped_counted_and_listed_with_its_reason(tmp_path):
    gate = _Gate()
    model = _three_layer_net()
    one_snapshot = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("weight"))
    # room for two snapshots in flight, not three
    mon = Monitor(
        model,
        every_n_steps=1,
        at_end=False,
        log_dir=tmp_path,
        analyze_fn=gate,
        max_pending_bytes=2 * one_snapshot + 1,
        **OPTS,
    )
    for step in range(1, 7):
        mon.step(step)
    gate.open.set()
    mon.close()
    assert mon.stats["snapshots"] == 2 and mon.stats["skipped"] == 4
    assert mon.skipped_steps == [3, 4, 5, 6]
    lines = [json.loads(x) for x in (tmp_path / "esdwatch" / "skipped_snapshots.jsonl").read_text().splitlines()]
    assert [d["global_step"] for d in lines] == [3, 4, 5, 6]
    assert all("2 snapshot(s)" in d["reason"] and "max_pending_bytes" in d["reason"] for d in lines), lines
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [1, 2]


def test_one_snapshot_is_always_allowed_whatever_its_size(tmp_path):
    model = _three_layer_net()
    mon = Monitor(model, every_n_steps=2, log_dir=tmp_path, max_pending_bytes=1, on_backpressure="block", **OPTS)
    _train(model, mon, 6)
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [2, 4, 6]


def test_the_default_budget_is_a_quarter_of_the_available_memory_capped():
    budget = default_pending_budget(on_gpu=False)
    assert 0 < budget <= DEFAULT_BUDGET_CAP


def test_counts_are_exact_when_the_final_snapshot_takes_a_skipped_step(tmp_path):
    gate = _Gate()
    model = _three_layer_net()
    mon = Monitor(model, every_n_steps=2, log_dir=tmp_path, analyze_fn=gate, max_pending=1, **OPTS)
    for step in range(1, 7):
        mon.step(step)  # step 2 is taken; 4 and 6 are skipped while it is held
    assert mon.skipped_steps == [4, 6]
    gate.open.set()
    mon.close()  # at_end takes step 6 after all
    written = sorted({r.global_step for r in read_records(tmp_path)})
    assert written == [2, 6] and mon.skipped_steps == [4] and mon.stats["skipped"] == 1
    assert len(written) + mon.stats["skipped"] == 3  # every scheduled step is either written or counted
    lines = [json.loads(x) for x in (tmp_path / "esdwatch" / "skipped_snapshots.jsonl").read_text().splitlines()]
    assert [(d["global_step"], d.get("taken_after_all", False)) for d in lines] == [(4, False), (6, False), (6, True)]
