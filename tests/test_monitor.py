"""esdwatch.Monitor in plain PyTorch loops; the alarm policy; records.jsonl reading and writing."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import warnings

import pytest
import torch
from torch import nn

from esdwatch.alarms import Alarm, AlarmRule
from esdwatch.alarms.policy import AlarmPolicy
from esdwatch.engine.analyzer import analyze_layers
from esdwatch.engine.layers import find_layers
from esdwatch.monitor import EsdwatchError, EsdwatchWarning, Monitor, auto_interval
from esdwatch.schema import LayerRecord, LayerReport
from esdwatch.sinks.jsonl import JsonlSink, read_alarms, read_records

FIELDS = ("alpha", "lambda_max", "stable_rank", "entropy", "log_norm", "mp_softrank", "status", "N", "M")
OPTS = dict(min_evals=8, traps=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 24, generator=g), torch.randint(0, 4, (16,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _numbers(report: LayerReport):
    return tuple(getattr(report, f) for f in FIELDS)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- plain loops


def test_plain_loop_records_exact_steps_with_the_numbers_of_an_offline_analysis(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=5, at_start=True, log_dir=tmp_path, on_backpressure="block", **OPTS)
    saved = {0: copy.deepcopy(model.state_dict())}
    mon.start()
    for step in range(1, 23):
        _train_step(model, opt, step)
        assert mon.step(step) is False
        mon.step(step)  # a repeated call (gradient accumulation) takes nothing
        if step % 5 == 0:
            saved[step] = copy.deepcopy(model.state_dict())
    saved[22] = copy.deepcopy(model.state_dict())
    mon.close()

    records = read_records(tmp_path)
    assert [(r.global_step, r.name) for r in records] == [(s, n) for s in (0, 5, 10, 15, 20, 22) for n in ("0", "2")]
    assert mon.stats["snapshots"] == 6 and mon.stats["skipped"] == 0 and mon.stats["analysed"] == 6
    for step, state in saved.items():
        ref = _mlp()
        ref.load_state_dict(state)
        expected = analyze_layers(find_layers(ref, min_evals=8)[0], mon.config)
        got = [r.report for r in records if r.global_step == step]
        assert [_numbers(r) for r in got] == [_numbers(r) for r in expected]
    assert all(r.segment == 0 and r.epoch == 0 and r.wall_time > 1e9 for r in records)
    assert records[0].report.N == 32 and records[0].report.M == 24
    lines = (tmp_path / "esdwatch" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["global_step"] in saved for line in lines)


def test_context_manager_exception_keeps_records_and_takes_no_final_snapshot(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="user code failed"):
        with Monitor(model, every_n_steps=2, log_dir=tmp_path, on_backpressure="block", **OPTS) as mon:
            for step in range(1, 8):
                _train_step(model, opt, step)
                mon.step(step)
                if step == 7:
                    raise RuntimeError("user code failed")
    assert {r.global_step for r in read_records(tmp_path)} == {2, 4, 6}  # no at_end snapshot at 7
    assert all(isinstance(obj, dict) for obj in _lines(tmp_path / "esdwatch" / "records.jsonl"))
    assert mon.in_flight == 0


class _Gate:
    """An analyze_fn that blocks until released (a worker that is behind)."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, mats, config):
        self.calls += 1
        self.release.wait(60)
        return analyze_layers(mats, config)


def test_backpressure_skip_is_counted_and_warned_once(tmp_path, caplog):
    gate = _Gate()
    model = _mlp()
    mon = Monitor(model, every_n_steps=1, at_end=False, log_dir=tmp_path, analyze_fn=gate, max_pending=1, **OPTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 11):
            mon.step(step)
    skips = [w for w in caught if issubclass(w.category, EsdwatchWarning)]
    assert len(skips) == 1 and "skipped the snapshot at step 2" in str(skips[0].message)
    assert mon.stats["skipped"] == 9 and mon.skipped_steps == list(range(2, 11))
    gate.release.set()
    mon.close()
    assert gate.calls == 1
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [1]


def test_block_mode_waits_instead_of_skipping(tmp_path):
    model = _mlp()
    mon = Monitor(model, every_n_steps=1, log_dir=tmp_path, on_backpressure="block", **OPTS)
    for step in range(1, 6):
        mon.step(step)
    mon.close()
    assert mon.stats["skipped"] == 0
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [1, 2, 3, 4, 5]


def _fails_on_layer_2(mats, config):
    if any(m.name == "2" for m in mats):
        raise ValueError("layer 2 exploded")
    return analyze_layers(mats, config)


def test_worker_error_is_logged_with_the_layer_name_and_training_continues(tmp_path, caplog):
    model = _mlp()
    mon = Monitor(
        model, every_n_steps=2, log_dir=tmp_path, analyze_fn=_fails_on_layer_2, on_backpressure="block", **OPTS
    )
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        for step in range(1, 6):
            mon.step(step)
        mon.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("layer '2' at step 2 failed: ValueError: layer 2 exploded" in m for m in messages)
    records = read_records(tmp_path)
    assert [(r.global_step, r.name, r.report.status) for r in records] == [
        (s, n, "ok" if n == "0" else "failed") for s in (2, 4, 5) for n in ("0", "2")
    ]
    assert mon.stats["failed_layers"] == 3


def test_strict_reraises_worker_errors_on_the_training_thread_after_writing(tmp_path):
    model = _mlp()
    mon = Monitor(
        model,
        every_n_steps=2,
        at_end=False,
        log_dir=tmp_path,
        analyze_fn=_fails_on_layer_2,
        on_backpressure="block",
        max_pending=1,  # step 4 waits for step 2's result
        strict=True,
        **OPTS,
    )
    mon.step(1)
    mon.step(2)
    with pytest.raises(EsdwatchError, match="2: ValueError: layer 2 exploded"):
        mon.step(4)  # blocks for step 2's result, handles it, raises
    with pytest.raises(EsdwatchError, match="at step 4"):
        mon.close()  # step 4 failed too: raised after everything is closed
    assert mon.in_flight == 0 and mon.parts.runtime.executor is None
    assert [(r.global_step, r.report.status) for r in read_records(tmp_path)][:2] == [(2, "ok"), (2, "failed")]


def test_nan_weights_raise_non_finite_stop_and_keep_the_record(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=3, log_dir=tmp_path, on_backpressure="block", max_pending=1, **OPTS)
    stopped_at = None
    for step in range(1, 16):
        _train_step(model, opt, step)
        if step == 6:  # after the optimizer step: only layer 2 is non-finite at the snapshot
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")
        if mon.step(step):
            stopped_at = step
            break
    mon.close()
    # the NaN snapshot is step 6; its result is handed back by step 9 at the latest (block)
    assert stopped_at is not None and 6 <= stopped_at <= 9
    alarm = read_alarms(tmp_path)[0]
    assert (alarm.kind, alarm.layer, alarm.step, alarm.severity, alarm.value) == ("non_finite", "2", 6, "error", 1.0)
    assert mon.stop_reasons[0].kind == "non_finite"
    rec = {(r.global_step, r.name): r.report for r in read_records(tmp_path)}
    assert rec[(3, "2")].status == "ok"
    assert rec[(6, "2")].status == "non_finite" and rec[(6, "2")].num_non_finite == 1
    assert rec[(6, "0")].status == "ok"


def test_no_analyzable_layer_warns_once_and_training_continues(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=1, log_dir=tmp_path)
    with pytest.warns(EsdwatchWarning, match="no analyzable layer") as caught:
        for step in range(1, 6):
            g = torch.Generator().manual_seed(step)
            loss = model(torch.randn(4, 8, generator=g)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert mon.step(step) is False
        mon.close()
    assert len([w for w in caught if "no analyzable layer" in str(w.message)]) == 1
    assert "M=4 < min_evals=50" in str(caught[0].message)
    assert read_records(tmp_path) == [] and mon.stats["empty_snapshots"] == 5


def test_a_failure_inside_esdwatch_skips_the_snapshot_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import esdwatch.monitor.distributed as monitor_mod

    calls = []

    def flaky_find_layers(model, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot walk this model")
        return find_layers(model, **kw)

    monkeypatch.setattr(monitor_mod, "find_layers", flaky_find_layers)
    mon = Monitor(_mlp(), every_n_steps=2, log_dir=tmp_path, on_backpressure="block", **OPTS)
    with caplog.at_level(logging.ERROR, logger="esdwatch.monitor"):
        for step in range(1, 7):
            assert mon.step(step) is False
        mon.close()
    assert sorted({r.global_step for r in read_records(tmp_path)}) == [2, 6]
    assert mon.stats["internal_errors"] == 1
    assert any("discovering the layers failed at step 4" in r.getMessage() for r in caplog.records)


def test_layers_replaced_removed_and_frozen_between_snapshots(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=3, log_dir=tmp_path, on_backpressure="block", **OPTS)
    for step in range(1, 13):
        _train_step(model, opt, step)
        if step == 4:
            model[0].weight.requires_grad_(False)  # frozen: still watched
            model[2] = nn.Linear(32, 20)  # replaced by a new shape
            model[4] = nn.Linear(20, 4)
        if step == 7:
            model[2] = nn.Identity()  # removed
            model[4] = nn.Linear(32, 16)  # a new analysable layer appears
        mon.step(step)
    mon.close()
    seen = [(r.global_step, r.name, r.report.N, r.report.M, r.report.status) for r in read_records(tmp_path)]
    assert seen == [
        (3, "0", 32, 24, "ok"),
        (3, "2", 32, 32, "ok"),
        (6, "0", 32, 24, "ok"),
        (6, "2", 32, 20, "ok"),
        (9, "0", 32, 24, "ok"),
        (9, "4", 32, 16, "ok"),
        (12, "0", 32, 24, "ok"),
        (12, "4", 32, 16, "ok"),
    ]
    # the frozen layer's weights did not move after step 4
    by = {(r.global_step, r.name): r.report for r in read_records(tmp_path)}
    assert by[(6, "0")].lambda_max == by[(12, "0")].lambda_max


@pytest.mark.filterwarnings("ignore::esdwatch.monitor.EsdwatchWarning")
def test_sinks_get_records_in_step_order_on_the_calling_thread_and_a_broken_sink_is_contained(tmp_path, caplog):
    class Recorder:
        def __init__(self):
            self.steps, self.threads, self.alarms, self.closed = [], set(), [], False

        def write(self, records, step):
            assert all(r.global_step == step for r in records)
            self.steps.append(step)
            self.threads.add(threading.get_ident())

        def alarm(self, alarm):
            self.alarms.append(alarm)

        def close(self):
            self.closed = True

    class Broken:
        def write(self, records, step):
            raise OSError("disk full")

        def alarm(self, alarm):
            raise OSError("disk full")

        def close(self):
            raise OSError("disk full")

    rec = Recorder()
    mon = Monitor(_mlp(), every_n_steps=1, log_dir=None, sinks=[Broken(), rec], max_pending=3, **OPTS)
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        for step in range(1, 8):
            mon.step(step)
        mon.close()
    assert rec.steps == sorted(rec.steps) and rec.steps[0] == 1 and rec.steps[-1] == 7
    assert len(rec.steps) == mon.stats["snapshots"] and rec.threads == {threading.get_ident()}
    assert rec.closed
    assert sum("sink Broken failed in write" in r.getMessage() for r in caplog.records) == 1
    assert mon.records_path is None and set(mon.latest) == {"0", "2"} and mon.latest_step == 7
    assert set(mon.latest_summary) >= {"alpha", "alpha_weighted", "stable_rank", "entropy"}


class _Keep:
    """A sink that keeps every record it receives (with its eigenvalues)."""

    def __init__(self):
        self.records = []

    def write(self, records, step):
        self.records += records

    def alarm(self, alarm):
        pass

    def close(self):
        pass


def _run_plain(model, mon, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.start()
    for step in range(1, steps + 1):
        _train_step(model, opt, step)
        mon.step(step)
    mon.close()


def test_keep_evals_writes_the_spectra_next_to_the_records_without_a_sink_argument(tmp_path):
    from esdwatch.schema import log10_histogram
    from esdwatch.sinks.spectra import SpectraSink, read_spectra

    keep = _Keep()
    model = _mlp()
    mon = Monitor(
        model,
        every_n_steps=5,
        at_start=True,
        keep_evals=True,
        log_dir=tmp_path,
        sinks=[keep],
        on_backpressure="block",
        **OPTS,
    )
    assert mon.sinks == [keep]  # added when the outputs open, in the output directory (known by then)
    _run_plain(model, mon, 12)
    assert [type(s) for s in mon.sinks] == [_Keep, SpectraSink]
    out = tmp_path / "esdwatch"
    records = read_records(out)
    spectra = read_spectra(out)
    assert (
        list(spectra)
        == [(r.global_step, r.name) for r in records]
        == [(s, n) for s in (0, 5, 10, 12) for n in ("0", "2")]
    )
    # each line is the log10 histogram of that snapshot's eigenvalues, as the sinks received them
    assert len((out / "spectra.jsonl").read_text().splitlines()) == 8
    for rec in keep.records:
        want, got = log10_histogram(rec.report.evals), spectra[(rec.global_step, rec.name)]
        assert got.counts.tolist() == want.counts.tolist() and got.num == rec.report.num_evals == rec.report.M
        assert (got.lo, got.hi, got.num_floor) == (pytest.approx(want.lo), pytest.approx(want.hi), want.num_floor)
    # without keep_evals there are no eigenvalues, hence no spectra file
    plain = Monitor(
        _mlp(), every_n_steps=5, log_dir=tmp_path / "plain", on_backpressure="block", keep_evals=False, **OPTS
    )
    _run_plain(plain.model, plain, 6)
    assert (tmp_path / "plain" / "esdwatch" / "records.jsonl").exists()
    assert not (tmp_path / "plain" / "esdwatch" / "spectra.jsonl").exists() and plain.sinks == []


def test_a_spectra_sink_given_by_the_user_is_the_only_one(tmp_path):
    from esdwatch.sinks.spectra import SpectraSink, read_spectra

    # the user's sink writes to the monitor's own directory: one line per (step, layer), not two
    own = SpectraSink(tmp_path / "esdwatch", bins=16)
    mon = Monitor(
        _mlp(), every_n_steps=3, keep_evals=True, log_dir=tmp_path, sinks=[own], on_backpressure="block", **OPTS
    )
    _run_plain(mon.model, mon, 7)
    assert mon.sinks == [own]
    lines = [json.loads(x) for x in (tmp_path / "esdwatch" / "spectra.jsonl").read_text().splitlines()]
    assert [(d["global_step"], d["name"]) for d in lines] == [(s, n) for s in (3, 6, 7) for n in ("0", "2")]
    assert all(len(d["counts"]) == 16 for d in lines)  # the user's bins, not the default 64
    # ... or elsewhere: then the monitor's directory gets none
    elsewhere = SpectraSink(tmp_path / "mine")
    mon = Monitor(
        _mlp(),
        every_n_steps=3,
        keep_evals=True,
        log_dir=tmp_path / "run2",
        sinks=[elsewhere],
        on_backpressure="block",
        **OPTS,
    )
    _run_plain(mon.model, mon, 4)
    assert not (tmp_path / "run2" / "esdwatch" / "spectra.jsonl").exists()
    assert sorted(read_spectra(tmp_path / "mine")) == [(s, n) for s in (3, 4) for n in ("0", "2")]


def test_auto_interval_formula_and_auto_mode(tmp_path, caplog):
    assert auto_interval(0.5, 0.1, 0.01, 0.05) == 1000  # the budget binds: 0.5 / (0.05 * 0.01)
    assert auto_interval(0.01, 1.0, 0.01, 0.05) == 125  # the worker's wall time binds: 1.25 * 1.0 / 0.01
    assert auto_interval(0.0, 0.0, 0.01, 0.05) == 1
    # overspending so far (the first, measuring snapshot; a worker's start-up) is paid back by waiting longer ...
    assert auto_interval(0.5, 0.1, 0.01, 0.05, debt_s=0.5) == 2000
    # ... and an unspent budget shortens the wait, never below the worker's pace
    assert auto_interval(0.5, 0.1, 0.01, 0.05, debt_s=-0.5) == 13
    with pytest.raises(ValueError):
        auto_interval(1.0, 1.0, 0.0, 0.05)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, log_dir=tmp_path, at_end=False, on_backpressure="block", **OPTS)  # "auto" by default
    assert mon.every_n_steps == "auto" and mon.interval is None
    with caplog.at_level(logging.INFO, logger="esdwatch.monitor"):
        for step in range(1, 60):
            _train_step(model, opt, step)
            mon.step(step)
        mon.drain()
    steps = sorted({r.global_step for r in read_records(tmp_path)})
    assert steps[0] == 10  # the first measurement
    assert isinstance(mon.interval, int) and mon.interval >= 1
    assert any("every_n_steps='auto' ->" in r.getMessage() for r in caplog.records)
    assert all(b - a >= 1 for a, b in zip(steps, steps[1:]))
    mon.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every_n_steps=0), "every_n_steps must be a positive int"),
        (dict(every_n_steps="often"), "every_n_steps must be a positive int"),
        (dict(every_n_steps=5, every_n_epochs=1), "exactly one"),
        (dict(every_n_epochs=0), "every_n_epochs must be a positive int"),
        (dict(worker="gpu"), "worker must be one of"),
        (dict(on_backpressure="drop"), "on_backpressure must be one of"),
        (dict(max_pending=0), "max_pending must be an int >= 1"),
        (dict(max_overhead=1.5), "max_overhead"),
        (dict(dtype="float16"), "dtype must be"),
        (dict(alarm_actions={"rank_colapse": "stop"}), "unknown alarm kind 'rank_colapse'"),
        (dict(alarm_actions={"rank_collapse": "explode"}), "must be one of"),
        (dict(alarm_patience=0), "patience must be an int >= 1"),
        (dict(device="cuda", worker="process"), "worker='thread'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Monitor(_mlp(), **kwargs)


def test_monitor_without_a_model_says_so():
    mon = Monitor(every_n_steps=1)
    with pytest.raises(RuntimeError, match="has no model"):
        mon.step(1)
    mon.close(final=False)
    with pytest.raises(TypeError):
        Monitor("not a model")


def test_plain_resume_continues_at_the_next_step_with_one_record_per_step_and_layer(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every_n_steps=4, log_dir=tmp_path, on_backpressure="block", **OPTS)
    state = None
    for step in range(1, 15):  # "crashes" after step 14, last checkpoint at step 9
        _train_step(model, opt, step)
        mon.step(step)
        if step == 9:
            state = mon.state_dict()
            summary = dict(mon.latest_summary)
    mon.abort()
    assert state["last_step"] == 9 and state["last_snapshot_step"] == 8 and state["segment"] == 0

    mon2 = Monitor(model, every_n_steps=4, log_dir=tmp_path, on_backpressure="block", **OPTS)
    mon2.load_state_dict(json.loads(json.dumps(state)))
    # the summary of the checkpoint's last snapshot is back before the resumed run's first snapshot
    assert summary and mon2.latest_summary == summary
    mon2.start(9)
    for step in range(10, 19):
        _train_step(model, opt, step)
        mon2.step(step)
    mon2.close()
    raw = read_records(tmp_path, dedupe=False)
    assert sorted({r.global_step for r in raw}) == [4, 8, 12, 16, 18]
    assert len(raw) == 2 * 6  # step 12 written by both segments
    records = read_records(tmp_path)
    assert [(r.global_step, r.segment) for r in records[::2]] == [(4, 0), (8, 0), (12, 1), (16, 1), (18, 1)]
    assert len({(r.global_step, r.name) for r in records}) == len(records) == 10


# ------------------------------------------------------------------ alarm policy


def _report(name="L", phase="unknown", **fields):
    base = dict(
        name=name,
        kind="linear",
        N=64,
        M=64,
        Q=1.0,
        alpha=4.0,
        rank_collapse_fraction=0.0,
        num_traps=0,
        phase=phase,
        phase_confidence=0.9,
    )
    base.update(fields)
    return LayerReport(**base)


def test_patience_fires_once_per_episode_and_resets():
    policy = AlarmPolicy(patience=3)
    low = _report(alpha=1.5)
    ok = _report(alpha=4.0)
    fired = [policy.update([r], step) for step, r in enumerate([low, low, ok, low, low, low, low, ok, low, low, low])]
    steps = [step for step, alarms in enumerate(fired) for a in alarms if a.kind == "alpha_low"]
    assert steps == [5, 10]  # 3 consecutive (3, 4, 5) and (8, 9, 10); the break at 2 and 7 re-arms
    alarm = fired[5][0]
    assert (alarm.layer, alarm.value, alarm.threshold, alarm.extra["consecutive"]) == ("L", 1.5, 2.0, 3)


def test_non_finite_defaults_to_patience_1_and_stop_others_to_log():
    policy = AlarmPolicy()
    assert policy.patience_for("non_finite") == 1 and policy.action_for("non_finite") == "stop"
    assert policy.patience_for("rank_collapse") == 2 and policy.action_for("rank_collapse") == "log"
    nan = _report(status="non_finite", num_non_finite=3)
    (alarm,) = policy.update([nan], 7)
    assert (alarm.kind, alarm.step, alarm.value, alarm.severity) == ("non_finite", 7, 3.0, "error")
    policy = AlarmPolicy(patience={"rank_collapse": 1}, actions={"rank_collapse": "stop"})
    assert policy.patience_for("rank_collapse") == 1 and policy.patience_for("alpha_low") == 2
    assert policy.stopping_kinds == ["rank_collapse", "non_finite"] or set(policy.stopping_kinds) == {
        "rank_collapse",
        "non_finite",
    }


def test_layers_that_disappear_lose_their_counters_and_failed_layers_keep_them():
    policy = AlarmPolicy(patience=2)
    assert policy.update([_report("A", alpha=1.5), _report("B", alpha=1.5)], 1) == []
    # B disappears, A's analysis fails: A keeps its count, B starts over when it returns
    assert policy.update([_report("A", status="failed")], 2) == []
    assert policy.counters == {("alpha_low", "A"): 1}
    fired = policy.update([_report("A", alpha=1.5), _report("B", alpha=1.5)], 3)
    assert [(a.layer, a.step) for a in fired] == [("A", 3)]


def test_phase_transitions_need_patience_and_keep_a_history():
    policy = AlarmPolicy(patience={"phase_transition": 2})
    seq = [
        "Random-like",
        "Random-like",
        "Bulk+Spikes",
        "Random-like",
        "Bulk+Spikes",
        "Bulk+Spikes",
        "unknown",
        "Heavy-Tailed",
        "Heavy-Tailed",
    ]
    out = []
    for step, phase in enumerate(seq):
        out += policy.update([_report("L", phase=phase)], step * 10)
    assert [(a.kind, a.step, a.extra["from"], a.extra["to"], a.severity) for a in out] == [
        ("phase_transition", 50, "Random-like", "Bulk+Spikes", "info"),
        ("phase_transition", 80, "Bulk+Spikes", "Heavy-Tailed", "info"),
    ]
    assert policy.history == {"L": [[50, "Random-like", "Bulk+Spikes"], [80, "Bulk+Spikes", "Heavy-Tailed"]]}
    restored = AlarmPolicy(patience={"phase_transition": 2})
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.history == policy.history and restored.phases == policy.phases


def test_the_classifiers_unknown_phase_is_never_a_transition_endpoint():
    # the classifier writes Phase.UNKNOWN.value ("Unknown"); a layer that could not be classified
    # first, then is, has no transition (it sets its baseline silently), and an Unknown
    # snapshot in between neither starts nor breaks one
    from esdwatch.schema import Phase

    policy = AlarmPolicy(patience={"phase_transition": 1})
    out = []
    for step, phase in enumerate(
        [Phase.UNKNOWN.value, "Heavy-Tailed", Phase.UNKNOWN.value, "Heavy-Tailed", "UNKNOWN", "Bulk-decay"]
    ):
        out += policy.update([_report("L", phase=phase)], step)
    assert [(a.extra["from"], a.extra["to"], a.step) for a in out] == [("Heavy-Tailed", "Bulk-decay", 5)]
    assert policy.history == {"L": [[5, "Heavy-Tailed", "Bulk-decay"]]}


def test_policy_state_round_trips_through_json():
    policy = AlarmPolicy(patience=3)
    policy.update([_report("A", alpha=1.5, rank_collapse_fraction=0.9)], 1)
    policy.update([_report("A", alpha=1.5, rank_collapse_fraction=0.9)], 2)
    restored = AlarmPolicy(patience=3)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.counters == {("alpha_low", "A"): 2, ("rank_collapse", "A"): 2}
    fired = restored.update([_report("A", alpha=1.5, rank_collapse_fraction=0.9)], 3)
    assert sorted(a.kind for a in fired) == ["alpha_low", "rank_collapse"]


def test_alarm_actions_warn_and_callable(tmp_path, caplog):
    seen = []

    def on_collapse(context, alarm):
        seen.append((context, alarm.kind, alarm.layer, alarm.step))

    def broken(context, alarm):
        raise RuntimeError("action bug")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 32))
    with torch.no_grad():  # layer 1 has rank 2 from the start
        model[1].weight.copy_(torch.randn(32, 2) @ torch.randn(2, 32))
    rules = [AlarmRule("rank_collapse", "rank_collapse_fraction", 0.5, above=True, severity="error")]
    mon = Monitor(
        model,
        every_n_steps=1,
        log_dir=tmp_path,
        on_backpressure="block",
        alarm_rules=rules,
        alarm_patience=1,
        alarm_actions={"rank_collapse": on_collapse, "non_finite": broken},
        **OPTS,
    )
    for step in range(1, 4):
        mon.step(step)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with caplog.at_level(logging.ERROR, logger="esdwatch.monitor"):
        mon.step(4)
        mon.close(final=False)
    assert seen == [(mon, "rank_collapse", "1", 1)]  # patience 1, fires once while it persists
    assert any("alarm action" in r.getMessage() and "non_finite" in r.getMessage() for r in caplog.records)
    assert not mon.should_stop  # non_finite's action was replaced by the callable
    kinds = [(a.kind, a.layer, a.step) for a in read_alarms(tmp_path)]
    assert kinds == [("rank_collapse", "1", 1), ("non_finite", "0", 4)]

    mon = Monitor(
        model,
        every_n_steps=1,
        log_dir=None,
        on_backpressure="block",
        alarm_rules=[],
        alarm_actions={"non_finite": "warn"},
        **OPTS,
    )
    with pytest.warns(EsdwatchWarning, match=r"\[non_finite\] at step 1: 0: 1 non-finite"):
        mon.step(1)
        mon.close(final=False)


# ---------------------------------------------------------------------- JSONL


def _record(step, name, segment=0, alpha=3.0):
    return LayerRecord(step, 0, 1.0, LayerReport(name=name, kind="linear", N=64, M=32, Q=2.0, alpha=alpha), segment)


def test_jsonl_truncated_last_line_is_skipped_and_repaired_on_append(tmp_path, caplog):
    sink = JsonlSink(tmp_path).open()
    sink.write([_record(1, "a"), _record(1, "b")], 1)
    sink.close()
    path = tmp_path / "records.jsonl"
    path.write_bytes(path.read_bytes() + b'{"global_step": 2, "name": "a", "ki')  # killed mid-write
    assert [(r.global_step, r.name) for r in read_records(path)] == [(1, "a"), (1, "b")]
    sink = JsonlSink(tmp_path).open()
    assert sink.segment == 1
    sink.write([_record(3, "a", segment=1)], 3)
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[2].endswith('"ki')  # the fragment stays on its own line
    with caplog.at_level(logging.WARNING):
        got = read_records(path, dedupe=False)
    assert [(r.global_step, r.name) for r in got] == [(1, "a"), (1, "b"), (3, "a")]
    assert any("line 3 is not valid JSON" in r.getMessage() for r in caplog.records)


def test_jsonl_segments_supersede_what_an_interrupted_run_wrote_after_its_checkpoint(tmp_path):
    s0 = JsonlSink(tmp_path, segment=0).open()
    for step in (4, 8, 12, 16):
        s0.write([_record(step, "a", 0, alpha=step)], step)
    s0.alarm(Alarm("alpha_low", "a", 1.0, 2.0, "m", step=12))
    s0.close()
    s1 = JsonlSink(tmp_path, segment=1, resumed_from_step=9).open()  # resumed from step 9
    s1.write([_record(12, "a", 1, alpha=120.0)], 12)
    s1.close()
    got = [(r.global_step, r.segment, r.report.alpha) for r in read_records(tmp_path)]
    assert got == [(4, 0, 4.0), (8, 0, 8.0), (12, 1, 120.0)]  # 16 of the old run is superseded too
    assert read_alarms(tmp_path) == []  # the alarm at 12 belonged to the superseded branch
    assert len(read_alarms(tmp_path, dedupe=False)) == 1
    # a fresh run in the same directory supersedes everything before it
    s2 = JsonlSink(tmp_path).open()
    assert s2.segment == 2
    s2.write([_record(4, "a", 2, alpha=44.0)], 4)
    s2.close()
    assert [(r.global_step, r.report.alpha) for r in read_records(tmp_path)] == [(4, 44.0)]
    assert math.isnan(Alarm.from_dict({"kind": "k", "layer": "l", "message": "m"}).value)
