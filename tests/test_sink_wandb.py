"""W&B sink: real offline runs (``WANDB_MODE=offline``), read back from the run's own
transaction log with wandb's reader, ``wandb leet inspect --json <run dir>`` (wandb 0.31).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _sink_helpers import fit_digits, synthetic_snapshots
from esdwatch.alarms import Alarm, AlarmRule
from esdwatch.engine.phases import Phase
from esdwatch.rundir import read_alarms
from esdwatch.sinks import read_records, sinks_for_loggers

wandb = pytest.importorskip("wandb")
from esdwatch.sinks.dashboard import ALARM_COLUMNS  # noqa: E402
from esdwatch.sinks.wandb import MAX_HIST_BINS, TABLE_COLUMNS, WandbSink  # noqa: E402

LAYERS = {"encoder.0": "Random-like", "head": "Heavy-Tailed"}
STEPS = (0, 10, 20)


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """Offline, quiet, and every wandb file under the test's tmp directory."""
    for var, sub in (
        ("WANDB_DIR", "wb"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def inspect_run(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb log, as wandb's own reader prints them."""
    exe = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run(
        [exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def _json_nums(alarm) -> list:
    d = alarm.to_dict()
    return [d["value"], d["threshold"]]


def alarm_table_rows(run_dir: Path, items: list[dict], key: str = "esdwatch/alarms") -> list[list]:
    """The rows of the alarm table over the logged increments (or the last full table), as W&B stores them."""
    rows: list[list] = []
    for it in items:
        table = json.loads((run_dir / "files" / it[f"{key}.path"]).read_text())
        assert table["columns"] == list(ALARM_COLUMNS)
        rows = rows + table["data"] if it[f"{key}._type"] == "incremental-table-file" else table["data"]
    return rows


@pytest.fixture(scope="module")
def snapshots():
    return synthetic_snapshots(LAYERS, STEPS)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_offline_run_holds_scalars_spectra_figures_table_and_rate_limited_alerts(tmp_path, snapshots):
    run = wandb.init(project="esdwatch-test", dir=str(tmp_path / "wb"), settings=wandb.Settings(x_disable_stats=True))
    clock = FakeClock()
    sink = WandbSink(run, figure_every=2, clock=clock, alert_interval_s=600, max_alerts=4)
    for step in STEPS:
        sink.write(snapshots[step], step)
    long_layer = "model.encoder.layers.11.attention.self.query_key_value.lora_A.default"
    alarms = [
        (0.0, Alarm("alpha_low", "head", 1.7, 2.0, "head: alpha = 1.7 < 2 (alpha low)", step=20)),  # sent
        (10.0, Alarm("alpha_low", "head", 1.6, 2.0, "head again", step=20)),  # same key, too soon
        (20.0, Alarm("phase_transition", "head", 4.0, 3.0, "head: Bulk-decay -> Heavy-Tailed", "info", 20)),
        (30.0, Alarm("rank_collapse", long_layer, 0.8, 0.5, "collapsed", "error", 20)),  # sent, long title
        (700.0, Alarm("alpha_low", "head", 1.5, 2.0, "head after the interval", step=20)),  # sent
        (710.0, Alarm("alpha_high", "encoder.0", 7.0, 6.0, "encoder.0 alpha high", "warning", 20)),  # sent
        (720.0, Alarm("correlation_trap", "encoder.0", 2.0, 0.5, "over max_alerts", step=20)),  # capped
    ]
    for t, alarm in alarms:
        clock.t = t
        sink.alarm(alarm)
    sink.close()
    run_dir = Path(run.dir).parent
    run.finish()
    assert sink.alerts_sent == 4 and sink.alerts_suppressed == 2

    recs = inspect_run(run_dir)
    metrics = [r["metric"] for r in recs if r["type"] == "metric"]
    assert {"glob_name": "esdwatch/*", "step_metric": "trainer/global_step"}.items() <= next(
        m for m in metrics if m.get("glob_name") == "esdwatch/*"
    ).items()

    everything = history(recs)
    items = [it for it in everything if "esdwatch/alarms._type" not in it]
    # one wandb.log per snapshot, keyed by the logged step, never by step=
    assert [it["trainer/global_step"] for it in items] == list(STEPS)
    assert [it["_step"] for it in items] == [0, 1, 2]
    # then every alarm (alerted or not) as a row of the alarm table, logged at close (no end_snapshot here)
    (logged,) = [it for it in everything if "esdwatch/alarms._type" in it]
    assert logged["trainer/global_step"] == 20
    assert alarm_table_rows(run_dir, [logged]) == [
        [a.step, a.severity, a.kind, a.layer, a.value, a.threshold, a.message, a.advice] for _, a in alarms
    ]
    for it in items:
        step = it["trainer/global_step"]
        for rec in snapshots[step]:
            r = rec.report
            assert it[f"esdwatch/alpha/{rec.name}"] == pytest.approx(r.alpha, rel=1e-12)
            assert it[f"esdwatch/entropy/{rec.name}"] == pytest.approx(r.entropy, rel=1e-12)
            assert it[f"esdwatch/mp_softrank/{rec.name}"] == pytest.approx(r.mp_softrank, rel=1e-12)
            assert it[f"esdwatch/phase/{rec.name}"] == Phase.parse(r.phase).order
            assert f"esdwatch/num_traps/{rec.name}" not in it  # not computed (traps off): not logged
            key = f"esdwatch/esd_log10_eigenvalues/{rec.name}"
            assert it[f"{key}._type"] == "histogram"
            bins, values = it[f"{key}.bins"], it[f"{key}.values"]
            assert len(values) == 64 and len(bins) == 65 and sum(values) == 60
            x = np.log10(r.evals)
            assert bins[0] == pytest.approx(x.min()) and bins[-1] == pytest.approx(x.max())
        assert it["esdwatch/summary/alpha"] == pytest.approx(np.mean([rec.report.alpha for rec in snapshots[step]]))
    # figures and the table every 2 snapshots: steps 0 and 20
    figured = [it["trainer/global_step"] for it in items if "esdwatch/phase_map._type" in it]
    assert figured == [0, 20]
    last = items[-1]
    assert last["esdwatch/phase_map._type"] == "image-file"
    assert last["esdwatch/esd_figure/head._type"] == "image-file"
    assert (run_dir / "files" / last["esdwatch/phase_map.path"]).read_bytes()[:4] == b"\x89PNG"
    assert last["esdwatch/layers._type"] == "table-file"
    table = json.loads((run_dir / "files" / last["esdwatch/layers.path"]).read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    rows = {row[table["columns"].index("name")]: dict(zip(table["columns"], row)) for row in table["data"]}
    for rec in snapshots[20]:
        assert rows[rec.name]["global_step"] == 20
        assert rows[rec.name]["phase"] == rec.report.phase
        assert rows[rec.name]["alpha"] == pytest.approx(rec.report.alpha)

    alerts = [r["alert"] for r in recs if r["type"] == "alert"]
    assert [a["text"] for a in alerts] == [
        "head: alpha = 1.7 < 2 (alpha low) (step 20)",
        "collapsed (step 20)",
        "head after the interval (step 20)",
        "encoder.0 alpha high (step 20)",
    ]
    assert [a["level"] for a in alerts] == ["WARN", "ERROR", "WARN", "WARN"]
    assert all(len(a["title"]) < 64 for a in alerts)
    assert alerts[0]["title"] == "esdwatch alpha low: head"
    assert alerts[1]["title"].startswith("esdwatch rank collapse: model.encoder") and alerts[1]["title"].endswith("...")


def test_close_logs_the_figures_of_the_last_snapshot_and_bins_are_capped(tmp_path, snapshots):
    with pytest.raises(ValueError, match="512"):
        WandbSink(
            wandb.init(
                project="esdwatch-test", dir=str(tmp_path / "wb"), settings=wandb.Settings(x_disable_stats=True)
            ),
            hist_bins=MAX_HIST_BINS + 1,
        )
    run = wandb.run
    sink = WandbSink(run, figure_every=10, hist_bins=MAX_HIST_BINS, alerts=False)
    sink.write(snapshots[0], 0)
    sink.write(snapshots[10], 10)
    sink.close()
    run_dir = Path(run.dir).parent
    run.finish()
    items = history(inspect_run(run_dir))
    assert [it["trainer/global_step"] for it in items] == [0, 10, 10]
    assert len(items[0]["esdwatch/esd_log10_eigenvalues/head.values"]) == MAX_HIST_BINS
    assert "esdwatch/phase_map._type" in items[0] and "esdwatch/phase_map._type" not in items[1]
    assert items[2]["esdwatch/phase_map._type"] == "image-file"  # the final figures, at the last step
    assert not any(k.startswith("esdwatch/alpha/") for k in items[2])


# --------------------------------------------------------------- real Trainer run


def test_trainer_with_wandb_logger_offline(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from esdwatch.lightning import ESDMonitor

    torch.manual_seed(0)
    logger = WandbLogger(
        project="esdwatch-test",
        save_dir=str(tmp_path / "wb"),
        offline=True,
        settings=wandb.Settings(x_disable_stats=True),
    )
    # a rule that fires on every layer at the first snapshot: each must become a W&B alert
    monitor = ESDMonitor(
        every_n_steps=5,
        at_start=True,
        keep_evals=True,
        traps=False,
        on_backpressure="block",
        alarm_rules=[AlarmRule("alpha_low", "alpha", 100.0, above=False)],
        alarm_patience=1,
        log_dir=str(tmp_path / "logs"),
    )
    fit_digits(logger, monitor, max_steps=15)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    records = read_records(tmp_path / "logs")
    steps = sorted({r.global_step for r in records})
    assert steps == [0, 5, 10, 15]
    recs = inspect_run(run_dir)
    items = [it for it in history(recs) if any(k.startswith("esdwatch/alpha/") for k in it)]
    assert [it["trainer/global_step"] for it in items] == steps
    for it in items:
        for rec in (r for r in records if r.global_step == it["trainer/global_step"]):
            assert it[f"esdwatch/alpha/{rec.name}"] == pytest.approx(rec.report.alpha, rel=1e-12)
            assert it[f"esdwatch/esd_log10_eigenvalues/{rec.name}._type"] == "histogram"
            assert sum(it[f"esdwatch/esd_log10_eigenvalues/{rec.name}.values"]) == rec.report.num_evals
    # Lightning's own metrics share the trainer/global_step axis
    assert any("train/loss" in it and "trainer/global_step" in it for it in history(recs))
    # every alarm of the run is a row of the alarm table, logged once per snapshot that fired
    # alarms, at its step; a phase transition has no threshold (None, never NaN)
    fired = read_alarms(tmp_path / "logs")
    logged = [it for it in history(recs) if "esdwatch/alarms._type" in it]
    assert [it["trainer/global_step"] for it in logged] == sorted({a.step for a in fired})
    assert {it["esdwatch/alarms._type"] for it in logged} == {"incremental-table-file"}
    rows = alarm_table_rows(run_dir, logged)
    assert rows == [[a.step, a.severity, a.kind, a.layer, *_json_nums(a), a.message, a.advice] for a in fired]
    assert [(r[2], r[3]) for r in rows[:2]] == [("alpha_low", "net.0"), ("alpha_low", "net.2")]
    for row in rows:
        if row[2] == "phase_transition":
            assert row[5] is None and "nan" not in row[6].lower()
    alerts = [r["alert"] for r in recs if r["type"] == "alert"]
    assert sorted(a["title"] for a in alerts) == ["esdwatch alpha low: net.0", "esdwatch alpha low: net.2"]
    assert all(a["level"] == "WARN" and "step 0" in a["text"] for a in alerts)
    assert not math.isnan(records[0].report.alpha)


def test_factory_picks_the_wandb_sink_by_its_run(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project="esdwatch-test",
        save_dir=str(tmp_path / "wb"),
        offline=True,
        settings=wandb.Settings(x_disable_stats=True),
    )
    try:
        (sink,) = sinks_for_loggers([logger], figure_every=7, hist_bins=128, custom_scalars=False)
        assert isinstance(sink, WandbSink) and sink.run is logger.experiment
        assert sink.figure_every == 7 and sink.hist_bins == 128
    finally:
        wandb.finish()


def test_without_wandb_the_sink_names_the_extra():
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "import esdwatch.sinks\n"
        "try:\n"
        "    esdwatch.sinks.WandbSink(object())\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR: esdwatch's W&B sink needs wandb: pip install 'esdwatch[wandb]'" in out.stdout


def test_the_layer_table_and_scalars_carry_the_tail_law_fit_and_the_tail_path_estimates(tmp_path, snapshots):
    """fit="TPL" fields (best_fit, tpl_alpha, tpl_lambda, alpha_sigma) and the tail path's
    ``spectrum`` / ``estimated`` reach the W&B table; tpl_alpha is a per-layer scalar."""
    from esdwatch import analyze_matrix
    from esdwatch.engine.synthetic import make_phase_matrix
    from esdwatch.schema import LayerRecord

    tpl = analyze_matrix(make_phase_matrix("Heavy-Tailed", 120, 60, seed=3), name="head", traps=False, fit="TPL")
    assert tpl.best_fit and math.isfinite(tpl.tpl_alpha)
    exact = snapshots[0][0].report  # encoder.0, fit="PL", exact spectrum
    estimated = tpl.replace(spectrum="tail", estimated="entropy,mp_softrank,phase")
    run = wandb.init(project="esdwatch-test", dir=str(tmp_path / "wb"), settings=wandb.Settings(x_disable_stats=True))
    sink = WandbSink(run, figure_every=1, esd_figures=False, phase_map=False)
    sink.write([LayerRecord(7, 0, 0.0, exact), LayerRecord(7, 0, 0.0, estimated)], 7)
    sink.close()
    run_dir = Path(run.dir).parent
    run.finish()
    (item,) = [it for it in history(inspect_run(run_dir)) if "esdwatch/layers._type" in it]
    assert item["esdwatch/tpl_alpha/head"] == pytest.approx(tpl.tpl_alpha, rel=1e-12)
    assert "esdwatch/tpl_alpha/encoder.0" not in item  # fit="PL": not computed, not logged
    table = json.loads((run_dir / "files" / item["esdwatch/layers.path"]).read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    rows = {row[table["columns"].index("name")]: dict(zip(table["columns"], row)) for row in table["data"]}
    head, enc = rows["head"], rows["encoder.0"]
    assert head["best_fit"] == tpl.best_fit and head["tpl_alpha"] == pytest.approx(tpl.tpl_alpha)
    assert head["tpl_lambda"] == pytest.approx(tpl.tpl_lambda) and head["alpha_sigma"] == pytest.approx(tpl.alpha_sigma)
    assert head["spectrum"] == "tail" and head["estimated"] == "entropy,mp_softrank,phase"
    assert enc["alpha_sigma"] == pytest.approx(exact.alpha_sigma) and enc["spectrum"] == "exact"
    assert enc["best_fit"] is None and enc["tpl_alpha"] is None and enc["estimated"] is None  # empty, never "nan"
