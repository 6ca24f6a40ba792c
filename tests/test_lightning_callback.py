"""ESDMonitor inside real Lightning Trainers on CPU (tiny models, a few dozen steps).

The model, its data and the Trainer come from ``_lightning_helpers`` (shared with
test_resume.py and test_ddp.py).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import _lightning_helpers as H  # noqa: E402
from esdwatch.engine.analyzer import analyze_layers  # noqa: E402
from esdwatch.lightning import ESDMonitor, LightningESDMonitor  # noqa: E402
from esdwatch.monitor import EsdwatchError, EsdwatchWarning  # noqa: E402
from esdwatch.schema import summarize  # noqa: E402
from esdwatch.sinks.jsonl import read_alarms, read_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(min_evals=8, traps=False, logger_sinks=False)


def _trainer(tmp_path, callbacks, **kwargs):
    return H.trainer(tmp_path, callbacks, **{"max_steps": 23, **kwargs})


def _steps(tmp_path, sub="esdwatch"):
    return [(r.global_step, r.epoch, r.name) for r in read_records(Path(tmp_path) / sub)]


def _valid_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ schedule


def test_records_at_exactly_the_scheduled_steps_and_monitorable_summaries(tmp_path):
    assert ESDMonitor is LightningESDMonitor and issubclass(ESDMonitor, L.Callback)
    cb = ESDMonitor(every_n_steps=5, at_start=True, on_backpressure="block", **OPTS)
    ckpt = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="esdwatch/summary/stable_rank", mode="max", every_n_train_steps=5
    )
    trainer = _trainer(tmp_path, [cb, ckpt], enable_checkpointing=True)
    model = H.net()
    trainer.fit(model)
    assert trainer.global_step == 23
    # 16 batches per epoch: steps 20 and 23 are in epoch 1
    assert _steps(tmp_path) == [
        (s, e, n) for s, e in [(0, 0), (5, 0), (10, 0), (15, 0), (20, 1), (23, 1)] for n in ("net.0", "net.2")
    ]
    records = read_records(tmp_path / "esdwatch")
    final = [r.report for r in records if r.global_step == 23]
    # the final record is the analysis of the final weights
    from esdwatch.engine.layers import find_layers

    expected = analyze_layers(find_layers(model, min_evals=8)[0], cb.monitor.config)
    assert [(r.alpha, r.stable_rank, r.entropy) for r in final] == [
        (r.alpha, r.stable_rank, r.entropy) for r in expected
    ]
    # the model-level averages of a snapshot are in callback_metrics, where ModelCheckpoint found one
    logged = {
        k.rsplit("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("esdwatch/summary/")
    }
    summaries = {s: summarize([r.report for r in records if r.global_step == s]) for s in (0, 5, 10, 15, 20, 23)}
    matching = [
        s
        for s, summ in summaries.items()
        if set(logged) == {k for k, v in summ.items() if math.isfinite(v)}
        and all(abs(summ[k] - v) <= 1e-5 * max(1.0, abs(v)) for k, v in logged.items())
    ]
    assert matching and set(logged) >= {"alpha", "alpha_weighted", "stable_rank", "entropy", "log_norm"}
    assert ckpt.best_model_score is not None and math.isfinite(float(ckpt.best_model_score))
    assert cb.monitor.stats["skipped"] == 0


def test_gradient_accumulation_counts_optimizer_steps_once(tmp_path):
    cb = ESDMonitor(every_n_steps=3, on_backpressure="block", **OPTS)
    trainer = _trainer(tmp_path, [cb], max_steps=8, accumulate_grad_batches=3)
    trainer.fit(H.net())
    assert trainer.global_step == 8
    # 16 batches per epoch with accumulation 3: 6 optimizer steps in epoch 0 (the last one on 1 batch)
    assert _steps(tmp_path) == [(s, e, n) for s, e in [(3, 0), (6, 0), (8, 1)] for n in ("net.0", "net.2")]
    assert cb.monitor.stats["snapshots"] == 3


def test_every_n_epochs_snapshots_at_epoch_ends(tmp_path):
    cb = ESDMonitor(every_n_epochs=2, on_backpressure="block", **OPTS)
    trainer = _trainer(tmp_path, [cb], max_steps=-1, max_epochs=4)
    trainer.fit(H.net())
    # end of epochs 1 and 3 (16 steps each); at_end at step 64 is the same snapshot
    assert _steps(tmp_path) == [(s, e, n) for s, e in [(32, 1), (64, 3)] for n in ("net.0", "net.2")]


def test_process_worker_writes_the_same_records_as_the_thread_worker(tmp_path):
    runs = {}
    for worker in ("thread", "process"):
        cb = ESDMonitor(every_n_steps=4, at_start=True, worker=worker, on_backpressure="block", **OPTS)
        _trainer(tmp_path / worker, [cb], max_steps=9).fit(H.net())
        runs[worker] = [
            (r.global_step, r.name, r.report.alpha, r.report.stable_rank, r.report.mp_softrank, r.report.phase)
            for r in read_records(tmp_path / worker / "esdwatch")
        ]
        info = cb.monitor.stats
        assert info["skipped"] == 0 and info["snapshots"] == 4
    assert [x[:2] for x in runs["thread"]] == [(s, n) for s in (0, 4, 8, 9) for n in ("net.0", "net.2")]
    assert runs["process"] == runs["thread"]


# ------------------------------------------------------------------- alarms


def test_rank_collapse_raises_the_alarm_and_stops_within_patience(tmp_path):
    # one snapshot in flight, block: each snapshot waits for the previous one's result
    cb = ESDMonitor(
        every_n_steps=2, on_backpressure="block", max_pending=1, alarm_actions={"rank_collapse": "stop"}, **OPTS
    )
    trainer = _trainer(tmp_path, [H.after_step(H.collapse_from(5)), cb], max_steps=200)
    trainer.fit(H.net())
    records = {(r.global_step, r.name): r.report for r in read_records(tmp_path / "esdwatch")}
    assert records[(4, "net.2")].rank_collapse_fraction == 0.0
    assert records[(6, "net.2")].rank_collapse_fraction > 0.9  # collapsed from step 5 on
    collapse = [a for a in read_alarms(tmp_path / "esdwatch") if a.kind == "rank_collapse"]
    # patience 2: the second collapsed snapshot (step 8) fires
    assert [(a.layer, a.step, a.extra["consecutive"]) for a in collapse] == [("net.2", 8, 2)]
    assert cb.monitor.stop_reasons[0].kind == "rank_collapse"
    # the step-8 result is handed back by the next snapshot at the latest (block): training stopped there
    assert 8 <= trainer.global_step <= 10
    assert trainer.should_stop


def test_nan_weights_stop_training_by_default_and_the_record_is_kept(tmp_path):
    def poison(trainer, module):
        if trainer.global_step == 6:
            module.net[2].weight[3, 3] = float("nan")

    cb = ESDMonitor(every_n_steps=3, on_backpressure="block", max_pending=1, **OPTS)
    trainer = _trainer(tmp_path, [H.after_step(poison), cb], max_steps=200)
    trainer.fit(H.net())
    assert 6 <= trainer.global_step <= 9
    rec = {(r.global_step, r.name): r.report for r in read_records(tmp_path / "esdwatch")}
    assert rec[(6, "net.2")].status == "non_finite" and rec[(6, "net.2")].num_non_finite == 1
    assert rec[(6, "net.0")].status == "ok" and rec[(3, "net.2")].status == "ok"
    first = read_alarms(tmp_path / "esdwatch")[0]
    assert (first.kind, first.layer, first.step) == ("non_finite", "net.2", 6)


def _fails_on_net2(mats, config):
    if any(m.name == "net.2" for m in mats):
        raise ZeroDivisionError("bad layer")
    return analyze_layers(mats, config)


def test_worker_error_is_logged_with_the_layer_name_and_training_continues(tmp_path, caplog):
    cb = ESDMonitor(every_n_steps=4, on_backpressure="block", analyze_fn=_fails_on_net2, **OPTS)
    trainer = _trainer(tmp_path, [cb], max_steps=10)
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        trainer.fit(H.net())
    assert trainer.global_step == 10
    assert any("layer 'net.2' at step 4 failed: ZeroDivisionError: bad layer" in r.getMessage() for r in caplog.records)
    statuses = [
        (s, n, st)
        for s, n, st in ((r.global_step, r.name, r.report.status) for r in read_records(tmp_path / "esdwatch"))
    ]
    assert statuses == [(s, n, "ok" if n == "net.0" else "failed") for s in (4, 8, 10) for n in ("net.0", "net.2")]


def test_strict_reraises_the_worker_error_in_the_training_loop(tmp_path):
    cb = ESDMonitor(
        every_n_steps=4, on_backpressure="block", max_pending=1, analyze_fn=_fails_on_net2, strict=True, **OPTS
    )
    trainer = _trainer(tmp_path, [cb], max_steps=40)
    with pytest.raises(EsdwatchError, match="net.2: ZeroDivisionError: bad layer"):
        trainer.fit(H.net())
    assert trainer.global_step <= 8  # raised when step 4's result came back
    assert cb.monitor.in_flight == 0


class _Gate:
    def __init__(self):
        self.release = threading.Event()

    def __call__(self, mats, config):
        self.release.wait(60)
        return analyze_layers(mats, config)


class _Release(L.Callback):
    def __init__(self, gate):
        self.gate = gate

    def on_train_end(self, trainer, pl_module):
        self.gate.set()


def test_a_full_queue_skips_and_counts(tmp_path):
    gate = _Gate()
    cb = ESDMonitor(every_n_steps=1, at_end=False, analyze_fn=gate, max_pending=1, **OPTS)
    trainer = _trainer(tmp_path, [_Release(gate.release), cb], max_steps=8)
    with pytest.warns(EsdwatchWarning, match="skipped the snapshot at step 2"):
        trainer.fit(H.net())
    assert trainer.global_step == 8
    assert cb.monitor.stats["skipped"] == 7 and cb.monitor.skipped_steps == [2, 3, 4, 5, 6, 7, 8]
    assert _steps(tmp_path) == [(1, 0, "net.0"), (1, 0, "net.2")]  # drained at on_train_end


# -------------------------------------------------------------- interruptions


def test_keyboard_interrupt_mid_run_leaves_valid_records(tmp_path):
    cb = ESDMonitor(every_n_steps=2, on_backpressure="block", **OPTS)
    trainer = _trainer(tmp_path, [cb], max_steps=100)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown: on_exception, teardown, exit(1)
            trainer.fit(H.net(raise_at=9, exc=KeyboardInterrupt))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C
    lines = _valid_json_lines(tmp_path / "esdwatch" / "records.jsonl")
    assert sorted({d["global_step"] for d in lines}) == [2, 4, 6, 8]  # the step-8 analysis in flight is kept
    assert len(lines) == 8 and cb.monitor.in_flight == 0


def test_an_exception_mid_run_leaves_valid_records_and_propagates(tmp_path):
    cb = ESDMonitor(every_n_steps=2, on_backpressure="block", **OPTS)
    trainer = _trainer(tmp_path, [cb], max_steps=100)
    with pytest.raises(RuntimeError, match="interrupted by the test"):
        trainer.fit(H.net(raise_at=5))
    lines = _valid_json_lines(tmp_path / "esdwatch" / "records.jsonl")
    assert sorted({d["global_step"] for d in lines}) == [2, 4]  # no final snapshot after a failure


# ------------------------------------------------------------------- inputs


def test_no_analyzable_layer_warns_and_training_continues(tmp_path):
    cb = ESDMonitor(every_n_steps=2, logger_sinks=False)
    trainer = _trainer(tmp_path, [cb], max_steps=6)
    with pytest.warns(EsdwatchWarning, match=r"no analyzable layer in the model at step 2 \(1 candidate"):
        trainer.fit(H.net(widths=(24, 4)))  # M=4 < min_evals=50
    assert trainer.global_step == 6
    assert read_records(tmp_path / "esdwatch") == []


def test_fast_dev_run_and_sanity_checks_take_no_snapshot(tmp_path):
    cb = ESDMonitor(every_n_steps=1, at_start=True, **OPTS)
    trainer = _trainer(tmp_path, [cb], fast_dev_run=3)
    trainer.fit(H.net())
    assert cb.monitor is None and not (tmp_path / "esdwatch").exists()


def test_two_named_monitors_coexist_pickle_cleanly_and_checkpoint_their_state(tmp_path):
    # one snapshot in flight, block: step 6 waits for step 3's result, so a summary is logged during fit
    a = ESDMonitor(every_n_steps=3, name="a", layers="net.0", on_backpressure="block", max_pending=1, **OPTS)
    b = ESDMonitor(every_n_steps=4, name="b", layers="net.2", on_backpressure="block", max_pending=1, **OPTS)
    assert a.state_key != b.state_key and "name': 'a'" in a.state_key
    assert pickle.loads(pickle.dumps(a)).state_key == a.state_key  # ddp_spawn pickles callbacks
    trainer = _trainer(tmp_path, [a, b], max_steps=8)
    trainer.fit(H.net())
    assert _steps(tmp_path, "esdwatch/a") == [(3, 0, "net.0"), (6, 0, "net.0"), (8, 0, "net.0")]
    assert _steps(tmp_path, "esdwatch/b") == [(4, 0, "net.2"), (8, 0, "net.2")]
    assert "esdwatch/a/summary/alpha" in trainer.callback_metrics
    clone = pickle.loads(pickle.dumps(a))  # after fit: no thread, queue or file travels
    assert clone.monitor is None and type(clone) is LightningESDMonitor
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    states = torch.load(tmp_path / "x.ckpt", weights_only=False)["callbacks"]
    assert states[a.state_key]["last_snapshot_step"] == 8 and states[b.state_key]["last_snapshot_step"] == 8
    assert states[a.state_key]["output_dir"].endswith("esdwatch/a")


def _scalars(ea, tag):
    return {e.step: e.value for e in ea.Scalars(tag)}


def test_two_named_monitors_log_to_one_tensorboard_under_their_own_tags(tmp_path):
    """The monitor's name reaches its logger sinks: two monitors sharing one TensorBoardLogger (one
    SummaryWriter) write esdwatch/a/... and esdwatch/b/..., each equal to its own records."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = dict(OPTS, logger_sinks=True, on_backpressure="block", sink_options={"figures": False})
    a = ESDMonitor(every_n_steps=3, name="a", layers="net.0", keep_evals=True, **opts)
    b = ESDMonitor(
        every_n_steps=4,
        name="b",
        layers="net.2",
        keep_evals=False,  # b: scalars only
        **{**opts, "sink_options": {"figures": False, "histograms": False}},
    )
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, [a, b], max_steps=8, logger=logger, log_every_n_steps=4).fit(H.net())
    log_dir = Path(logger.log_dir)
    recs = {k: read_records(log_dir / "esdwatch" / k) for k in ("a", "b")}
    assert [(r.global_step, r.name) for r in recs["a"]] == [(3, "net.0"), (6, "net.0"), (8, "net.0")]
    assert [(r.global_step, r.name) for r in recs["b"]] == [(4, "net.2"), (8, "net.2")]

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    esd_tags = {t for t in tags if t.startswith("esdwatch/")}
    assert esd_tags and all(t.startswith(("esdwatch/a/", "esdwatch/b/")) for t in esd_tags)  # nothing unprefixed
    for key, layer in (("a", "net.0"), ("b", "net.2")):
        for metric in ("alpha", "stable_rank", "entropy", "mp_softrank"):
            want = {r.global_step: float(getattr(r.report, metric)) for r in recs[key]}
            got = _scalars(ea, f"esdwatch/{key}/{metric}/{layer}")
            assert sorted(got) == sorted(want)
            assert all(got[s] == pytest.approx(v, rel=1e-6) for s, v in want.items()), (key, metric)
        # the model averages too, under the same prefix as the summaries logged with pl_module.log
        got = _scalars(ea, f"esdwatch/{key}/summary/stable_rank")
        assert got == {r.global_step: pytest.approx(r.report.stable_rank, rel=1e-6) for r in recs[key]}
    assert not any(t.startswith("esdwatch/a/") and t.endswith("/net.2") for t in tags)  # a watched net.0 only
    assert not any(t.startswith("esdwatch/b/") and t.endswith("/net.0") for t in tags)
    # a keeps the eigenvalues: its histograms (TensorBoard) and spectra.jsonl are its own, b has neither
    assert set(ea.Tags()["histograms"]) == {"esdwatch/a/esd_log10_eigenvalues/net.0"}
    assert (log_dir / "esdwatch" / "a" / "spectra.jsonl").exists()
    assert not (log_dir / "esdwatch" / "b" / "spectra.jsonl").exists()


def test_two_unnamed_monitors_writing_one_directory_are_refused_at_setup(tmp_path):
    a = ESDMonitor(every_n_steps=3, layers="net.0", **OPTS)
    b = ESDMonitor(every_n_steps=4, layers="net.2", **OPTS)
    assert a.state_key != b.state_key  # Lightning accepts both: esdwatch must refuse
    with pytest.raises(ValueError, match="same output directory.*distinct name="):
        _trainer(tmp_path, [a, b], max_steps=4).fit(H.net())
    assert not (tmp_path / "esdwatch").exists()  # refused before anything was written
    # different log_dirs do not collide
    a = ESDMonitor(every_n_steps=3, layers="net.0", log_dir=str(tmp_path / "x"), on_backpressure="block", **OPTS)
    b = ESDMonitor(every_n_steps=4, layers="net.2", log_dir=str(tmp_path / "y"), on_backpressure="block", **OPTS)
    _trainer(tmp_path, [a, b], max_steps=4).fit(H.net())
    assert _steps(tmp_path / "x") == [(3, 0, "net.0"), (4, 0, "net.0")]
    assert _steps(tmp_path / "y") == [(4, 0, "net.2")]


def test_keep_evals_gives_the_report_its_spectra_without_extra_wiring(tmp_path):
    """keep_evals=True and no sink argument (what the demo does): spectra.jsonl is written next to
    records.jsonl, once per (step, layer), and esdwatch report draws the ESD panels from it."""
    from esdwatch.reporting.html import build_report
    from esdwatch.sinks.spectra import SpectraSink, read_spectra

    cb = ESDMonitor(every_n_steps=5, at_start=True, keep_evals=True, on_backpressure="block", **OPTS)
    _trainer(tmp_path, [cb], max_steps=10).fit(H.net())
    assert [type(s) for s in cb.monitor.sinks] == [SpectraSink] and cb.sinks == []  # per fit, not accumulated
    out = tmp_path / "esdwatch"
    keys = [(r.global_step, r.name) for r in read_records(out)]
    assert keys == [(s, n) for s in (0, 5, 10) for n in ("net.0", "net.2")]
    assert list(read_spectra(out)) == keys
    assert len((out / "spectra.jsonl").read_text().splitlines()) == len(keys)  # no second writer
    assert {(k, h.num) for k, h in read_spectra(out).items()} == {(k, 24 if k[1] == "net.0" else 32) for k in keys}
    pytest.importorskip("matplotlib")
    html = build_report(out, tmp_path / "report", max_layers=1).read_text()
    assert "recorded no spectra" not in html and "esd_000_net.0.png" in html


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="exactly one"):
        ESDMonitor(every_n_steps=5, every_n_epochs=1)
    with pytest.raises(ValueError, match="unknown alarm kind"):
        ESDMonitor(alarm_actions={"nan": "stop"})
    pytest.importorskip("esdwatch.sinks.factory")
    with pytest.raises(ValueError, match=r"unknown sink_options \['figure_evry'\]"):
        ESDMonitor(sink_options={"figure_evry": 5})


# ---------------------------------------------------------------- frameworks


def test_pytorch_lightning_trainer_takes_the_pl_callback(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from esdwatch.lightning import PLESDMonitor

    cb = PLESDMonitor(every_n_steps=4, on_backpressure="block", **OPTS)
    assert isinstance(cb, pl.Callback) and not isinstance(cb, L.Callback)
    assert not isinstance(ESDMonitor(every_n_steps=4), pl.Callback)
    trainer = H.trainer(tmp_path, [cb], framework=H.PL, max_steps=9)
    assert isinstance(trainer, pl.Trainer)
    trainer.fit(H.net(H.PL))  # a pytorch_lightning module, not a lightning.pytorch one
    assert _steps(tmp_path) == [(s, 0, n) for s in (4, 8, 9) for n in ("net.0", "net.2")]


def test_the_yaml_config_parses_with_lightning_cli(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli"])  # pytest's own arguments are not the CLI's

    from esdwatch.demo import DigitsDataModule, DigitsMLP

    config = ROOT / "configs" / "esdwatch.yaml"
    cli = LightningCLI(
        DigitsMLP,
        DigitsDataModule,
        run=False,
        save_config_callback=None,
        args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LightningESDMonitor)]
    assert cb.every_n_steps == 50 and cb.monitor is None
    kw = {**vars(cb.options), **vars(cb.options.execution)}  # the options, the execution group flat
    assert kw["at_start"] is True and kw["worker"] == "thread" and kw["on_backpressure"] == "skip"
    assert kw["alarm_actions"] == {"rank_collapse": "warn", "non_finite": "stop"}
    assert kw["alarm_patience"] == {"rank_collapse": 2, "alpha_low": 3}
