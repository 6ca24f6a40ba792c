"""TensorBoard sink: event files written by a real SummaryWriter, read back with
TensorBoard's own EventAccumulator; then a real Trainer + TensorBoardLogger + ESDMonitor run.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch

from _sink_helpers import fit_digits, synthetic_snapshots
from esdwatch.alarms import Alarm
from esdwatch.engine.phases import Phase
from esdwatch.schema import SUMMARY_METRICS, LayerRecord
from esdwatch.sinks import TensorBoardSink, read_records, sinks_for_loggers
from esdwatch.sinks.tags import COUNT_METRICS, SCALAR_METRICS

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

LAYERS = {"encoder.0": "Random-like", "encoder.1": "Bulk+Spikes", "head": "Heavy-Tailed"}
STEPS = (0, 10, 20)


@pytest.fixture(scope="module")
def snapshots():
    return synthetic_snapshots(LAYERS, STEPS)


def _load(path) -> EventAccumulator:
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _expected(report, metric):
    value = getattr(report, metric)
    if metric == "phase":
        order = Phase.parse(value).order
        return None if order < 0 else float(order)
    if value is None or not math.isfinite(float(value)) or (metric in COUNT_METRICS and value < 0):
        return None
    return float(value)


def _layout(ea) -> layout_pb2.Layout:
    events = ea.Tensors("custom_scalars__config__")
    assert len(events) == 1, "add_custom_scalars must be written exactly once per writer"
    return layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])


def assert_scalars_equal_records(ea, records, prefix="esdwatch"):
    """Every per-layer scalar and model average equals the records (float32 precision)."""
    scalar_tags = set(ea.Tags()["scalars"])
    by_step: dict[int, list[LayerRecord]] = {}
    for rec in records:
        by_step.setdefault(rec.global_step, []).append(rec)
    for metric in SCALAR_METRICS:
        for name in {r.name for r in records}:
            want = {r.global_step: _expected(r.report, metric) for r in records if r.name == name}
            want = {s: v for s, v in want.items() if v is not None}
            tag = f"{prefix}/{metric}/{name}"
            if not want:
                assert tag not in scalar_tags
                continue
            got = {e.step: e.value for e in ea.Scalars(tag)}
            assert sorted(got) == sorted(want), tag
            for step, value in want.items():
                assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
    for metric in SUMMARY_METRICS:
        got = {e.step: e.value for e in ea.Scalars(f"{prefix}/summary/{metric}")}
        for step, recs in by_step.items():
            vals = [getattr(r.report, metric) for r in recs if math.isfinite(getattr(r.report, metric))]
            assert got[step] == pytest.approx(np.mean(vals), rel=1e-6), (metric, step)


# ---------------------------------------------------------------------------- unit


def test_scalars_histograms_figures_text_and_layout_read_back(tmp_path, snapshots):
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, figure_every=2)
    for step in STEPS:
        sink.write(snapshots[step], step)
    sink.alarm(Alarm("alpha_low", "head", 1.7, 2.0, "head: alpha = 1.7 < 2 (alpha low)", step=20))
    sink.close()
    writer.close()
    ea = _load(tmp_path)
    records = [r for step in STEPS for r in snapshots[step]]

    assert_scalars_equal_records(ea, records)
    phases = {e.step: e.value for e in ea.Scalars("esdwatch/phase/head")}
    assert phases == {s: 4.0 for s in STEPS}  # Heavy-Tailed is ordinal 4
    assert {e.step: e.value for e in ea.Scalars("esdwatch/phase/encoder.0")} == {s: 0.0 for s in STEPS}

    # spectra: one histogram per layer per snapshot, esdwatch's log10 bins, every eigenvalue
    assert sorted(ea.Tags()["histograms"]) == sorted(f"esdwatch/esd_log10_eigenvalues/{n}" for n in LAYERS)
    for name in LAYERS:
        events = ea.Histograms(f"esdwatch/esd_log10_eigenvalues/{name}")
        assert [e.step for e in events] == list(STEPS)
        for e in events:
            rec = next(r for r in snapshots[e.step] if r.name == name)
            h = e.histogram_value
            x = np.log10(rec.report.evals)
            assert h.num == rec.report.num_evals == 60 and sum(h.bucket) == 60
            assert h.min == pytest.approx(x.min()) and h.max == pytest.approx(x.max())
            assert h.bucket_limit[0] == pytest.approx(x.min()) and h.bucket_limit[-1] == pytest.approx(x.max())
            assert len(h.bucket_limit) == 65 and h.bucket[0] == 0  # 64 bins + the empty left-edge bucket
            counts, _ = np.histogram(x, bins=64, range=(x.min(), x.max()))
            assert list(h.bucket[1:]) == counts.tolist()

    # figures every 2 snapshots (the first included): steps 0 and 20
    images = ea.Tags()["images"]
    assert sorted(images) == sorted([f"esdwatch/esd_figure/{n}" for n in LAYERS] + ["esdwatch/phase_map"])
    for tag in images:
        events = ea.Images(tag)
        assert [e.step for e in events] == [0, 20]
        assert all(
            e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and e.width > 200 and e.height > 100 for e in events
        )

    # custom-scalars layout: one multi-line chart per metric whose regex catches every layer
    layout = _layout(ea)
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    scalar_tags = ea.Tags()["scalars"]
    for metric in ("alpha", "entropy", "mp_softrank"):
        (regex,) = charts[metric].multiline.tag
        assert sorted(t for t in scalar_tags if re.search(regex, t)) == sorted(f"esdwatch/{metric}/{n}" for n in LAYERS)
    assert any(re.search(r, "esdwatch/summary/alpha") for c in charts.values() for r in c.multiline.tag)

    # text: the per-layer table at every snapshot, the alarm at its step
    tables = ea.Tensors("esdwatch/layers/text_summary")
    assert [t.step for t in tables] == list(STEPS)
    table = tables[-1].tensor_proto.string_val[0].decode()
    for rec in snapshots[20]:
        assert f"| {rec.name} | {rec.report.phase} | {rec.report.alpha:.3f} |" in table
    (alarm_text,) = ea.Tensors("esdwatch/alarms/text_summary")
    assert alarm_text.step == 20 and b"head: alpha = 1.7 < 2" in alarm_text.tensor_proto.string_val[0]


def test_layout_written_once_per_writer_and_steps_never_go_back(tmp_path, snapshots):
    writer = SummaryWriter(str(tmp_path))
    a = TensorBoardSink(writer, figures=False)
    b = TensorBoardSink(writer, name="second", figures=False, histograms=False)
    a.write(snapshots[10], 10)
    b.write(snapshots[10], 10)
    a.write(snapshots[20], 20)
    a.alarm(Alarm("rank_collapse", "head", 0.9, 0.5, "late alarm of an old snapshot", step=10))
    a.close()
    b.close()
    writer.close()
    ea = _load(tmp_path)
    layout = _layout(ea)  # exactly one layout event
    assert [c.title for c in layout.category][1:] == ["esdwatch: all layers", "esdwatch: model"]
    assert layout.category[0].title.startswith("esdwatch: phase per layer (0 Random-like, 1 Bleeding-out")
    assert {e.step for e in ea.Scalars("esdwatch/second/alpha/head")} == {10}
    (alarm_text,) = ea.Tensors("esdwatch/alarms/text_summary")
    assert alarm_text.step == 20  # clamped: TensorBoard drops data when a step goes back


def test_own_writer_from_a_directory_and_no_eigenvalues(tmp_path, snapshots, caplog):
    sink = TensorBoardSink(str(tmp_path / "tb"), figures=False)
    bare = [LayerRecord(r.global_step, 0, 0.0, r.report.replace(evals=None)) for r in snapshots[0]]
    with caplog.at_level(logging.WARNING, logger="esdwatch.sinks"):
        sink.write(bare, 0)
        sink.write(bare, 5)
    sink.close()  # closes the writer it created
    assert sink.writer.all_writers is None
    warnings = [r for r in caplog.records if "keep_evals=True" in r.getMessage()]
    assert len(warnings) == 1  # once, not per snapshot
    ea = _load(tmp_path / "tb")
    assert ea.Tags()["histograms"] == []
    assert {e.step for e in ea.Scalars("esdwatch/alpha/head")} == {0, 5}


# --------------------------------------------------------------- real Trainer run


def _fit_tensorboard(root):
    from lightning.pytorch.loggers import TensorBoardLogger

    from esdwatch.lightning import ESDMonitor

    torch.manual_seed(0)
    logger = TensorBoardLogger(str(root), name="run")
    monitor = ESDMonitor(every_n_steps=5, at_start=True, keep_evals=True, traps=False, on_backpressure="block")
    fit_digits(logger, monitor, max_steps=20)
    return logger


def test_trainer_with_tensorboard_logger_writes_what_the_records_say(tmp_path):
    logger = _fit_tensorboard(tmp_path)
    records = read_records(logger.log_dir)
    steps = sorted({r.global_step for r in records})
    names = sorted({r.name for r in records})
    assert steps == [0, 5, 10, 15, 20] and names == ["net.0", "net.2"]
    ea = _load(logger.log_dir)
    assert_scalars_equal_records(ea, records)
    for name in names:
        events = ea.Histograms(f"esdwatch/esd_log10_eigenvalues/{name}")
        assert [e.step for e in events] == steps
        assert all(sum(e.histogram_value.bucket) == 64 for e in events)
    # default figure_every=10: the first snapshot, and the last one at the end of fit; the
    # phase map also at each snapshot where a layer changed phase
    phases = {(r.global_step, r.name): r.report.phase for r in records}
    changed = [s for i, s in enumerate(steps) if i and any(phases[s, n] != phases[steps[i - 1], n] for n in names)]
    assert [e.step for e in ea.Images("esdwatch/phase_map")] == sorted({0, 20, *changed})
    assert [e.step for e in ea.Images("esdwatch/esd_figure/net.0")] == [0, 20]
    assert {f"esdwatch/esd_figure/{n}" for n in names} <= set(ea.Tags()["images"])
    charts = {c.title for cat in _layout(ea).category for c in cat.chart}
    assert {"alpha", "entropy", "mp_softrank"} <= charts
    # Lightning's own scalars are untouched by esdwatch's (later-arriving) steps
    assert [e.step for e in ea.Scalars("train/loss")] == [4, 9, 14, 19]


def test_factory_picks_the_tensorboard_sink_by_its_writer(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="x")
    (sink,) = sinks_for_loggers([logger], figure_every=3, name="probe", alerts=False)
    assert isinstance(sink, TensorBoardSink)
    assert sink.writer is logger.experiment and sink.figure_every == 3 and sink.prefix == "esdwatch/probe"
    with pytest.raises(TypeError, match="unknown sink option"):
        sinks_for_loggers([logger], figure_evry=3)
    # pytorch_lightning's logger is another class with the same capabilities: same sink
    pl_loggers = pytest.importorskip("pytorch_lightning.loggers")
    pl_logger = pl_loggers.TensorBoardLogger(str(tmp_path), name="pl")
    (pl_sink,) = sinks_for_loggers([pl_logger])
    assert isinstance(pl_sink, TensorBoardSink) and pl_sink.writer is pl_logger.experiment


def test_layout_grows_with_the_layers_of_a_rotation(tmp_path, snapshots):
    """Under layers_per_snapshot the first snapshot holds a subset: the layout is written again
    when new layers appear (TensorBoard shows the latest), and never for a known subset."""
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, figures=False, histograms=False)
    first, second = snapshots[10][:1], snapshots[20][1:]
    sink.write(first, 10)
    sink.write(second, 20)
    sink.write(first, 30)  # a known layer again: no new layout
    sink.close()
    writer.close()
    ea = _load(tmp_path)
    events = ea.Tensors("custom_scalars__config__")
    assert len(events) == 2
    charts = [
        [c.title for c in layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]).category[0].chart] for e in events
    ]
    assert charts[0] == [f"phase: {r.name}" for r in first]
    assert charts[1] == [f"phase: {r.name}" for r in first + second]
    (phases_text,) = [e for e in ea.Tensors("esdwatch/phases/text_summary") if e.step == 20]
    table = phases_text.tensor_proto.string_val[0].decode()
    assert all(name in table for name in LAYERS)  # each layer's latest phase, not only the subset's
