"""A rotating subset of layers per snapshot (``layers_per_snapshot``): coverage, record steps, summaries, resume.

The choice (:func:`esdwatch.monitor.rotation.pick`) is pure and checked on its own; the
monitor runs are real (a plain loop, a Lightning Trainer, a 2-process gloo DDP loop) and
assert on the records they wrote.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from _processes import run_bounded
from esdwatch.alarms.policy import AlarmPolicy
from esdwatch.alarms.rules import AlarmRule
from esdwatch.engine.analyzer import analyze_layers
from esdwatch.engine.layers import find_layers
from esdwatch.monitor import Monitor
from esdwatch.monitor.rotation import LayerRotation, pick, snapshot_budget
from esdwatch.rundir import read_records
from esdwatch.schema import LatestRecords, LayerRecord, LayerReport, summarize

OPTS = dict(min_evals=8, traps=False, verbose=False, on_backpressure="block")


def _mlp(n_layers: int = 6, width: int = 24) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)])


def _simulate(n_layers: int, snapshots: int, **kw) -> list[list[int]]:
    """The layers each snapshot takes when every pick is recorded as taken at its snapshot number."""
    last: list[int | None] = [None] * n_layers
    costs = kw.pop("costs", [1.0] * n_layers)
    out = []
    for s in range(snapshots):
        chosen = pick(last, costs, **kw)
        for i in chosen:
            last[i] = s
        out.append(chosen)
    return out


# ------------------------------------------------------------------ the pure choice


@pytest.mark.parametrize("n_layers,per", [(6, 2), (7, 3), (5, 5), (4, 9), (1, 1)])
def test_an_int_takes_round_robin_and_covers_every_layer_every_ceil_l_over_n_snapshots(n_layers, per):
    k = math.ceil(n_layers / per)
    taken = _simulate(n_layers, 4 * k, max_layers=per)
    assert all(len(t) == min(per, n_layers) for t in taken)
    for start in range(len(taken) - k + 1):  # any k consecutive snapshots cover every layer
        assert set().union(*map(set, taken[start : start + k])) == set(range(n_layers))
    assert taken[0] == list(range(min(per, n_layers)))  # never-snapshotted first, in discovery order


def test_a_cost_budget_takes_a_prefix_of_the_staleness_order_and_covers_within_the_bound():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 30)
        costs = [rng.uniform(0.1, 2.0) for _ in range(n)]
        budget = rng.uniform(max(costs), 3 * max(costs))
        taken = _simulate(n, 60, costs=costs, budget_s=budget)
        for t in taken:
            assert len(t) >= 1 and (len(t) == 1 or sum(costs[i] for i in t) <= budget + 1e-12)
        bound = math.ceil(sum(costs) / (budget - max(costs) + 1e-12)) + 1 if budget > max(costs) else n
        bound = min(bound, n)
        for start in range(len(taken) - bound + 1):
            assert set().union(*map(set, taken[start : start + bound])) == set(range(n)), (n, budget)


def test_nothing_measured_means_one_layer_and_an_over_budget_layer_still_goes_alone():
    assert pick([None] * 4, [None] * 4, budget_s=0.0) == [0]
    assert pick([None, None], [5.0, 1.0], budget_s=1.0) == [0]  # the most stale, even over the budget
    assert pick([3, 1, 2], [1.0, 1.0, 1.0], budget_s=2.0) == [1, 2]  # the two oldest
    assert pick([None] * 3, [1.0] * 3, nbytes=[10, 10, 10], max_bytes=25) == [0, 1]
    with pytest.raises(ValueError):
        pick([None], [1.0, 2.0])


def test_snapshot_budget_is_max_overhead_of_the_steps_it_is_paid_from():
    assert snapshot_budget(0.05, 0.2, 100) == pytest.approx(1.0)
    assert snapshot_budget(0.05, 0.2, 0) == pytest.approx(0.01)  # at least one step
    assert snapshot_budget(0.05, None, 100) is None and snapshot_budget(0.05, float("nan"), 10) is None


def test_measured_seconds_are_split_over_a_parts_layers_and_unmeasured_ones_use_the_rate():
    rot = LayerRotation("auto", 0.05)
    rot.note_layers({"a": 1.0, "b": 3.0, "c": 2.0})
    rot.observe(["a", "b"], 8.0)  # 2 s per unit, split 1:3
    assert rot.cost_s == pytest.approx({"a": 2.0, "b": 6.0})
    assert rot.estimate("c") == pytest.approx(4.0)  # not measured: its shape cost times the rate
    rot.observe(["a", "b"], 4.0)  # half as long now: each estimate moves halfway (COST_EMA = 0.5)
    assert rot.cost_s == pytest.approx({"a": 1.5, "b": 4.5})
    rot.observe(["gone"], 3.0)  # a layer no longer in the model is ignored
    assert "gone" not in rot.cost_s
    state = json.loads(json.dumps(rot.state_dict()))
    again = LayerRotation("auto", 0.05)
    again.load_state_dict(state)
    assert again.cost_s == rot.cost_s and again.unit_s == rot.unit_s


def test_latest_records_keep_rotated_layers_and_drop_at_once_without_rotation():
    def recs(step, names):
        return [LayerRecord(step, 0, 0.0, LayerReport(n, "linear", 4, 4, 1.0, alpha=float(step))) for n in names]

    lr = LatestRecords()
    assert [r.name for r in lr.update(recs(1, "ab"))] == ["a", "b"]
    assert [r.name for r in lr.update(recs(2, "cd"))] == ["a", "b", "c", "d"]  # a rotation: a and b are kept
    got = lr.update(recs(3, "ab"))
    assert {r.name: r.global_step for r in got} == {"a": 3, "b": 3, "c": 2, "d": 2}
    plain = LatestRecords()
    plain.update(recs(1, "abc"))
    plain.update(recs(2, "abc"))
    assert [r.name for r in plain.update(recs(3, "ab"))] == ["a", "b"]  # c left the model: gone at once


def test_alarm_patience_counts_a_rotated_layers_own_snapshots():
    rule = AlarmRule("over_regularized", "alpha", 2.0, above=False)
    policy = AlarmPolicy([rule], patience=2, phase_transitions=False)
    bad = LayerReport("a", "linear", 64, 64, 1.0, alpha=1.5)
    ok = LayerReport("b", "linear", 64, 64, 1.0, alpha=3.0)
    assert policy.update([bad], 1, kept=["b"]) == []
    assert policy.update([ok], 2, kept=["a"]) == []  # a not analysed: its count is kept
    fired = policy.update([bad], 3, kept=["b"])
    assert [(a.kind, a.layer) for a in fired] == [("over_regularized", "a")]


def test_fsdp1_units_take_the_choice_over_the_previous_snapshots_layers_and_every_new_layer():
    from esdwatch.engine.layers import LayerMatrix

    def mats(names):
        return [LayerMatrix(n, "linear", "Linear", torch.zeros(1, 16, 16)) for n in names]

    rot = LayerRotation(2, 0.05)
    first = rot.choice(1, None)
    assert first.unit(mats("ab")) == [True, True] and first.unit(mats("cd")) == [True, True]  # nothing known
    first.finish(1, list("abcd"))
    second = rot.choice(1, None)
    got = second.unit(mats("ab")) + second.unit(mats("cde"))  # e is new: taken too
    assert got == [True, True, False, False, True]
    second.finish(2, ["a", "b", "e"])
    third = rot.choice(1, None)
    assert third.unit(mats("abcde")) == [False, False, True, True, False]  # c, d: never taken since step 1


# ------------------------------------------------------------------ monitor runs


def _loop(mon: Monitor, model: nn.Module, steps: range) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for step in steps:
        loss = model(torch.randn(8, 24, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step)


def test_each_layer_is_recorded_at_the_steps_it_was_copied_and_the_summary_is_over_latest_values(tmp_path):
    model = _mlp(6)
    mon = Monitor(model, every_n_steps=2, layers_per_snapshot=2, log_dir=tmp_path, at_end=False, **OPTS)
    names = [f"{i}" for i in range(6)]
    weights_at: dict[tuple[int, str], torch.Tensor] = {}

    class Keep(nn.Module):
        pass

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        loss = model(torch.randn(8, 24, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n in names:
            weights_at[(step, n)] = model.get_submodule(n).weight.detach().clone()
        mon.step(step)
    mon.close()
    records = read_records(tmp_path / "esdwatch")
    got = sorted((r.global_step, r.name) for r in records)
    # round-robin: layers 0,1 at step 2, 2,3 at 4, 4,5 at 6, 0,1 at 8 ...
    want = sorted((s, names[(2 * (s // 2 - 1) + j) % 6]) for s in range(2, 13, 2) for j in range(2))
    assert got == want
    # each record is the analysis of that layer's weights at its step (not at another snapshot's step)
    cfg = mon.config
    for rec in records:
        lin = nn.Linear(24, 24, bias=False)
        lin.weight.data.copy_(weights_at[(rec.global_step, rec.name)])
        (ref,) = analyze_layers(find_layers(lin, min_evals=8)[0], cfg)
        assert rec.report.alpha == pytest.approx(ref.alpha, rel=1e-9) and rec.report.log_norm == pytest.approx(
            ref.log_norm, rel=1e-9
        )
    # latest holds every layer at its own latest step; the summary averages those, not the last subset
    assert {n: r.global_step for n, r in mon.latest.items()} == {
        "0": 8,
        "1": 8,
        "2": 10,
        "3": 10,
        "4": 12,
        "5": 12,
    }
    assert mon.latest_summary["alpha"] == pytest.approx(summarize(r.report for r in mon.latest.values())["alpha"])


def test_dashboard_summaries_and_the_html_report_use_each_layers_latest_values(tmp_path):
    pytest.importorskip("matplotlib")
    from esdwatch.reporting.html import build_report
    from esdwatch.sinks.metrics_logger import MetricsLoggerSink

    class Logger:
        def __init__(self):
            self.rows: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

    logger = Logger()
    model = _mlp(4)
    mon = Monitor(
        model,
        every_n_steps=1,
        layers_per_snapshot=2,
        log_dir=tmp_path,
        at_end=False,
        sinks=[MetricsLoggerSink(logger)],
        **OPTS,
    )
    _loop(mon, model, range(1, 5))
    mon.close()
    step, last = [row for row in logger.rows if "esdwatch/summary/alpha" in row[1]][-1]
    assert step == 4 and sum(k.startswith("esdwatch/alpha/") for k in last) == 2  # this snapshot's layers only
    expected = summarize(r.report for r in mon.latest.values())["alpha"]  # all four, each at its latest step
    assert last["esdwatch/summary/alpha"] == pytest.approx(expected)
    assert mon.latest_summary["alpha"] == pytest.approx(expected)
    page = build_report(tmp_path, max_layers=1).read_text(encoding="utf-8")
    assert "each layer as of its latest snapshot, steps 3 to 4" in page
    assert all(f"<td class='l'>{n}</td>" in page for n in "0123")


def test_resume_continues_the_rotation_with_the_most_stale_layers(tmp_path):
    model = _mlp(5)
    mon = Monitor(model, every_n_steps=1, layers_per_snapshot=2, log_dir=tmp_path, at_end=False, **OPTS)
    _loop(mon, model, range(1, 3))  # steps 1: {0,1}, 2: {2,3}
    state = json.loads(json.dumps(mon.state_dict()))
    mon.close()
    assert state["rotation"]["last_step"] == {"0": 1, "1": 1, "2": 2, "3": 2}
    again = Monitor(model, every_n_steps=1, layers_per_snapshot=2, log_dir=tmp_path, at_end=False, **OPTS)
    again.load_state_dict(state)
    _loop(again, model, range(3, 5))
    again.close()
    got = sorted((r.global_step, r.name) for r in read_records(tmp_path / "esdwatch"))
    # after the resume: layer 4 (never) and 0 (step 1), then 1 and 2
    assert got == sorted([(1, "0"), (1, "1"), (2, "2"), (2, "3"), (3, "0"), (3, "4"), (4, "1"), (4, "2")])


def test_auto_starts_with_one_layer_then_fits_the_budget_and_covers_every_layer(tmp_path):
    model = _mlp(8, width=48)
    mon = Monitor(
        model, every_n_steps=3, layers_per_snapshot="auto", max_overhead=0.5, log_dir=tmp_path, at_end=False, **OPTS
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 61):
        loss = model(torch.randn(8, 48, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.004)  # a step long enough that half of 3 steps pays for a few layers
        mon.step(step)
    mon.close()
    by_step: dict[int, list[str]] = {}
    for r in read_records(tmp_path / "esdwatch"):
        by_step.setdefault(r.global_step, []).append(r.name)
    steps = sorted(by_step)
    assert len(by_step[steps[0]]) == 1  # nothing measured yet: one layer
    assert all(1 <= len(v) <= 8 for v in by_step.values())
    seen: set[str] = set()
    for s in steps:
        seen |= set(by_step[s])
    assert seen == {str(i) for i in range(8)}  # every layer covered in the run
    rot = mon.parts.schedule.rotation
    assert set(rot.cost_s) == seen and all(c > 0 for c in rot.cost_s.values())


def test_a_layer_whose_scale_collapses_under_a_rotation_raises_the_history_alarm(tmp_path):
    """8 layers, 2 per snapshot (each layer every 4th snapshot): layer 5's weights are scaled
    down 10x after step 40; the scale_collapse alarm fires at its next analysis (step 44),
    comparing it with its own earlier analysis, and replaying the records fires the same."""
    from esdwatch.alarms import replay
    from esdwatch.rundir import read_alarms

    model = _mlp(8)
    mon = Monitor(model, every_n_steps=4, layers_per_snapshot=2, log_dir=tmp_path, at_end=False, **OPTS)
    _loop(mon, model, range(1, 41))
    with torch.no_grad():
        model[5].weight.mul_(0.1)
    _loop(mon, model, range(41, 81))
    mon.close()
    got = [(a.step, a.layer, a.extra["compared"]) for a in read_alarms(tmp_path) if a.kind == "scale_collapse"]
    # layer 5 is analysed at steps 12, 28, 44, 60, 76; at 44, layers 6 and 7 have 2 analyses (16, 32):
    # every layer is compared over 1 of its analyses, layer 5 with its analysis at 28
    assert got == [(44, "5", [28, 44])]
    replayed = [(a.step, a.layer) for a in replay(read_records(tmp_path)) if a.kind == "scale_collapse"]
    assert replayed == [(44, "5")]


def test_a_lightning_run_records_each_layer_at_its_rotation_steps(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    import _lightning_helpers as H
    from esdwatch.lightning import ESDMonitor

    cb = ESDMonitor(
        every_n_steps=4, layers_per_snapshot=1, min_evals=8, traps=False, logger_sinks=False, on_backpressure="block"
    )
    trainer = H.trainer(tmp_path, [cb], max_steps=16)
    model = H.net(widths=(24, 32, 32, 32, 4))
    trainer.fit(model)
    assert isinstance(trainer, L.Trainer) and trainer.global_step == 16
    got = sorted((r.global_step, r.name) for r in read_records(tmp_path / "esdwatch"))
    # three watched layers (net.6, 32 x 4, has M < min_evals), one per snapshot, at_end takes the next
    assert got == [(4, "net.0"), (8, "net.2"), (12, "net.4"), (16, "net.0")]
    assert {n: r.global_step for n, r in cb.monitor.latest.items()} == {"net.0": 16, "net.2": 8, "net.4": 12}


# ------------------------------------------------------------------ DDP: the same choice on every rank


def _slow_on_rank1(mats, config):
    if torch.distributed.get_rank() == 1:
        time.sleep(0.05)  # rank 1 measures slower analyses: the choice must not depend on it
    return analyze_layers(mats, config)


def _ddp_worker(rank: int, world: int, out: str, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(_mlp(6))
    mon = Monitor(
        model,
        every_n_steps=2,
        layers_per_snapshot="auto",
        max_overhead=0.5,
        rank=rank,
        world_size=world,
        log_dir=out,
        analyze_fn=_slow_on_rank1,
        **OPTS,
    )
    plans = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 25):
        loss = model(torch.randn(8, 24, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # steps long enough that the budget (0.5 x 2 steps) holds several layers on a loaded CI machine
        time.sleep(0.03)
        before = mon.snapshots
        mon.step(step)
        if mon.snapshots > before:
            plans.append([step, sorted(mon.owners.items())])
    mon.close()
    rot = mon.parts.schedule.rotation
    Path(out, f"rot{rank}.json").write_text(json.dumps({"plans": plans, "cost_s": rot.cost_s}))
    dist.destroy_process_group()


def _run_ddp(out: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, out, port), nprocs=2, join=True)


def test_ddp_ranks_pick_the_same_layers_and_share_the_work(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    code, out = run_bounded(
        [sys.executable, __file__, "ddp", str(tmp_path)], env=env, timeout_s=180, what="the rotation DDP run"
    )
    assert code == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rot{r}.json").read_text()) for r in (0, 1))
    assert r0["plans"] == r1["plans"] and len(r0["plans"]) >= 3
    assert r0["cost_s"] == r1["cost_s"]  # from the parts every rank received, not local timings
    assert len(r0["plans"][0][1]) == 1  # the first, unmeasured snapshot: one layer
    # every layer was covered, and a snapshot of several layers was shared by both ranks
    records = read_records(tmp_path / "esdwatch")
    assert {r.name for r in records} == {f"module.{i}" for i in range(6)}
    assert any(len({o for _, o in owners}) == 2 for _, owners in r0["plans"])


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        _run_ddp(sys.argv[2])
