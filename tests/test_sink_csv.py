"""Generic Lightning loggers (CSV) through ``log_metrics``, the logger-to-sink factory, and
logging without the optional packages.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from _sink_helpers import fit_digits
from esdwatch.alarms import AlarmRule
from esdwatch.engine.phases import Phase
from esdwatch.schema import SUMMARY_METRICS
from esdwatch.sinks import MetricsLoggerSink, read_alarms, read_records, sinks_for_loggers
from esdwatch.sinks.tags import COUNT_METRICS, SCALAR_METRICS


def _fit_csv(root):
    from lightning.pytorch.loggers import CSVLogger

    from esdwatch.lightning import ESDMonitor

    torch.manual_seed(0)
    logger = CSVLogger(str(root), name="csv")
    monitor = ESDMonitor(
        every_n_steps=5,
        at_start=True,
        traps=False,
        on_backpressure="block",
        alarm_rules=[AlarmRule("alpha_low", "alpha", 100.0, above=False)],
        alarm_patience=1,
    )
    fit_digits(logger, monitor, max_steps=15)
    return logger


def test_csv_logger_gets_every_scalar_of_every_snapshot(tmp_path):
    logger = _fit_csv(tmp_path)
    records = read_records(logger.log_dir)
    steps = sorted({r.global_step for r in records})
    assert steps == [0, 5, 10, 15]
    with open(f"{logger.log_dir}/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    esd_rows = {int(r["step"]): r for r in rows if r.get("esdwatch/alpha/net.0")}
    assert sorted(esd_rows) == steps
    for rec in records:
        row = esd_rows[rec.global_step]
        for metric in SCALAR_METRICS:
            value = getattr(rec.report, metric)
            cell = row[f"esdwatch/{metric}/{rec.name}"] if f"esdwatch/{metric}/{rec.name}" in row else ""
            if metric == "phase":
                assert float(cell) == Phase.parse(value).order
            elif value is None or not math.isfinite(float(value)) or (metric in COUNT_METRICS and value < 0):
                assert cell == ""  # not computed: not logged
            else:
                assert float(cell) == pytest.approx(float(value), rel=1e-9), (metric, rec.name)
    for step in steps:
        at = [r for r in records if r.global_step == step]
        for metric in SUMMARY_METRICS:
            vals = [getattr(r.report, metric) for r in at if math.isfinite(getattr(r.report, metric))]
            assert float(esd_rows[step][f"esdwatch/summary/{metric}"]) == pytest.approx(sum(vals) / len(vals))
    # the alarms, as the value that crossed the threshold, at their step
    alarms = [a for a in read_alarms(logger.log_dir) if a.kind == "alpha_low"]
    assert sorted(a.layer for a in alarms) == ["net.0", "net.2"]
    for a in alarms:
        alarm_rows = [r for r in rows if r.get(f"esdwatch/alarm/alpha_low/{a.layer}")]
        assert [int(r["step"]) for r in alarm_rows] == [a.step]
        assert float(alarm_rows[0][f"esdwatch/alarm/alpha_low/{a.layer}"]) == pytest.approx(a.value)
    # Lightning's own metrics are still there
    assert any(r.get("train/loss") for r in rows)


class NotebookLogger:
    """A user's own logger: all esdwatch needs is log_metrics."""

    def __init__(self) -> None:
        self.rows: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_factory_chooses_by_capability_and_tolerates_absent_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    assert sinks_for_loggers(None) == [] and sinks_for_loggers([]) == []
    csv_logger, mine = CSVLogger(str(tmp_path)), NotebookLogger()
    sinks = sinks_for_loggers([csv_logger, mine, object()], name="probe", figure_every=2)
    assert [type(s) for s in sinks] == [MetricsLoggerSink, MetricsLoggerSink]
    assert sinks[0].logger is csv_logger and sinks[1].logger is mine and sinks[1].prefix == "esdwatch/probe"
    (single,) = sinks_for_loggers(mine, summary=False)
    assert single.summary is False
    with pytest.raises(TypeError, match="unknown sink option"):
        sinks_for_loggers([mine], colour="red")


def test_import_esdwatch_and_sinks_loads_no_dashboard_package():
    code = textwrap.dedent(
        """
        import sys
        import esdwatch, esdwatch.sinks
        from esdwatch.sinks import TensorBoardSink, WandbSink, MetricsLoggerSink, sinks_for_loggers
        import esdwatch.reporting.figures, esdwatch.reporting.html
        assert sinks_for_loggers([]) == []
        heavy = [m for m in ("tensorboard", "torch.utils.tensorboard", "tensorboardX", "wandb", "matplotlib")
                 if m in sys.modules]
        print("LOADED:", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED: []" in out.stdout


def test_without_tensorboard_the_logger_is_skipped_with_the_extra_named(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, logging
        for m in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
            sys.modules[m] = None  # as if tensorboard were not installed
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from lightning.pytorch.loggers import TensorBoardLogger
        from esdwatch.sinks import TensorBoardSink, sinks_for_loggers
        print("SINKS:", sinks_for_loggers([TensorBoardLogger({str(tmp_path)!r})]))
        try:
            TensorBoardSink({str(tmp_path / "own")!r})
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SINKS: []" in out.stdout
    assert "pip install 'esdwatch[tensorboard]'" in out.stderr  # the factory's warning
    assert (
        "IMPORT-ERROR: esdwatch's TensorBoard sink needs tensorboard: pip install 'esdwatch[tensorboard]'" in out.stdout
    )
