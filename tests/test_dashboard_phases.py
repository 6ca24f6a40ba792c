"""What a user sees of a phase change and of every alarm in TensorBoard and W&B (issue 14,
items 9 and 10): a real Monitor whose layer is made Random-like, then Heavy-Tailed, with a
real TensorBoard writer (event files read back with TensorBoard's EventAccumulator) and a
real offline W&B run (read back with ``wandb leet inspect``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from esdwatch.alarms import AlarmRule
from esdwatch.engine.synthetic import make_phase_matrix
from esdwatch.monitor import Monitor
from esdwatch.rundir import read_alarms, read_records
from esdwatch.sinks.tags import ESD_HISTOGRAM_DESCRIPTION

pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from esdwatch.sinks import TensorBoardSink, WandbSink  # noqa: E402
from esdwatch.sinks.dashboard import ALARM_COLUMNS  # noqa: E402

PHASES = {1: "Random-like", 2: "Heavy-Tailed", 3: "Heavy-Tailed"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _table(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()[2:]]


def test_a_phase_change_and_every_alarm_reach_tensorboard_and_wandb(tmp_path, offline_wandb):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 120), nn.Linear(120, 60))
    fixed = make_phase_matrix("Bulk+Spikes", 60, 120, seed=3)
    writer = SummaryWriter(str(tmp_path / "tb"))
    run = wandb.init(project="esdwatch-test", dir=str(tmp_path / "wb"), settings=wandb.Settings(x_disable_stats=True))
    tb = TensorBoardSink(writer, figure_every=10, esd_figures=False)
    wb = WandbSink(run, figure_every=10, esd_figures=False, alerts=False)
    mon = Monitor(
        model,
        every_n_steps=1,
        at_end=False,
        log_dir=tmp_path / "logs",
        sinks=[tb, wb],
        # an alarm on every layer at every snapshot (re-armed each time by patience 1 and a
        # rule that always holds, it fires once per episode: at step 1) besides the transition
        alarm_rules=[AlarmRule("alpha_high", "alpha", 0.0, above=True, severity="info")],
        alarm_patience=1,
        min_evals=8,
        traps=False,
        keep_evals=True,
        on_backpressure="block",
        verbose=False,
    )
    for step, phase in PHASES.items():
        with torch.no_grad():
            model[0].weight.copy_(make_phase_matrix(phase, 120, 60, seed=step))
            model[1].weight.copy_(fixed)
        mon.step(step)
        mon.drain()
    mon.close()
    writer.close()
    run_dir = Path(run.dir).parent
    run.finish()

    records = read_records(tmp_path / "logs")
    got = {(r.global_step, r.name): r.report.phase for r in records}
    assert [got[s, "0"] for s in PHASES] == list(PHASES.values())  # the ground truth of the run
    alarms = read_alarms(tmp_path / "logs")
    (transition,) = [a for a in alarms if a.kind == "phase_transition"]
    assert transition.layer == "0" and transition.extra["from"] == "Random-like" and transition.step == 2
    assert {a.kind for a in alarms} == {"alpha_high", "phase_transition"}

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    ea.Reload()
    # Text tab: the phase table names the phase, the step it began and the one before
    phases = {e.step: _table(e.tensor_proto.string_val[0].decode()) for e in ea.Tensors("esdwatch/phases/text_summary")}
    assert sorted(phases) == [1, 2, 3]
    assert phases[1][0][:4] == ["0", "Random-like", "1", ""]
    assert phases[2][0][:4] == ["0", "**Heavy-Tailed** (new)", "2", "Random-like"]
    assert phases[3][0][:4] == ["0", "Heavy-Tailed", "2", "Random-like"]
    assert [row[:3] for row in phases[3][1:]] == [["1", got[3, "1"], "1"]]
    # the alarm table: every alarm of a step in one text, written once per step; no "nan"
    texts = {}
    for e in ea.Tensors("esdwatch/alarms/text_summary"):
        assert e.step not in texts, "one alarm text per step"
        texts[e.step] = e.tensor_proto.string_val[0].decode()
    assert sorted(texts) == sorted({a.step for a in alarms})
    assert "nan" not in " ".join(texts.values()).lower()
    line = re.compile(r"^- \*\*(\w+)\*\* `(\w+)`, layer `([^`]*)`: (.*)$")
    rows = [(step, *line.match(x).groups()) for step in sorted(texts) for x in texts[step].splitlines()]
    assert [(r[0], r[2], r[3]) for r in rows] == [(a.step, a.kind, a.layer) for a in alarms]
    (trow,) = [r for r in rows if r[2] == "phase_transition"]
    assert "Random-like -> Heavy-Tailed" in trow[4] and "threshold" not in trow[4]  # the phases by name
    assert all(
        re.search(r"\(value [-0-9.e]+, threshold 0\)(; \*advice\*: .+)?$", r[4]) for r in rows if r[2] == "alpha_high"
    )
    # Images: the phase map at the first snapshot, where the phase changed (figure_every=10),
    # and the last one at close
    assert [e.step for e in ea.Images("esdwatch/phase_map")] == [1, 2, 3]
    # Custom Scalars: a chart of its own per layer for the phase (one line: a step at the change)
    (layout_event,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    per_layer = layout.category[0]
    assert "0 Random-like, 1 Bleeding-out, 2 Bulk+Spikes, 3 Bulk-decay, 4 Heavy-Tailed, 5 Rank-collapse" in (
        per_layer.title
    )
    assert {c.title: list(c.multiline.tag) for c in per_layer.chart} == {
        "phase: 0": [r"^esdwatch/phase/0$"],
        "phase: 1": [r"^esdwatch/phase/1$"],
    }
    assert {e.step: e.value for e in ea.Scalars("esdwatch/phase/0")} == {1: 0.0, 2: 4.0, 3: 4.0}
    # Histograms: described as log10 eigenvalues
    assert ea.SummaryMetadata("esdwatch/esd_log10_eigenvalues/0").summary_description == ESD_HISTOGRAM_DESCRIPTION

    # W&B: every alarm in the alarm table, at its step, None where no value exists
    exe = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run(
        [exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120, check=True
    )
    items = [r["history"]["item"] for r in map(json.loads, out.stdout.splitlines()) if r["type"] == "history"]
    logged = [it for it in items if "esdwatch/alarms._type" in it]
    assert [it["trainer/global_step"] for it in logged] == sorted({a.step for a in alarms})
    table_rows: list[list] = []
    for it in logged:
        assert it["esdwatch/alarms._type"] == "incremental-table-file"
        table = json.loads((run_dir / "files" / it["esdwatch/alarms.path"]).read_text())
        assert table["columns"] == list(ALARM_COLUMNS)
        table_rows += table["data"]
    assert table_rows == [
        [a.step, a.severity, a.kind, a.layer, a.to_dict()["value"], a.to_dict()["threshold"], a.message, a.advice]
        for a in alarms
    ]
    (wrow,) = [r for r in table_rows if r[2] == "phase_transition"]
    assert wrow[5] is None and not re.search("nan", wrow[6], re.I)
    # the phase map also where the phase changed
    assert [it["trainer/global_step"] for it in items if "esdwatch/phase_map._type" in it] == [1, 2, 3]


@pytest.mark.parametrize("n_layers, map_steps", [(32, [0, 1, 2]), (33, [0, 2])])
def test_a_phase_change_redraws_the_map_at_once_in_models_of_at_most_32_layers(tmp_path, n_layers, map_steps):
    from _sink_helpers import synthetic_snapshots
    from esdwatch.schema import LayerRecord

    (base,) = synthetic_snapshots({"w": "Random-like"}, (0,))[0]
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, figure_every=10, esd_figures=False, histograms=False, text=False)
    for step, phase in enumerate(["Random-like", "Heavy-Tailed", "Heavy-Tailed"]):
        recs = [LayerRecord(step, 0, 0.0, base.report.replace(name=f"l{i}", phase=phase)) for i in range(n_layers)]
        sink.write(recs, step)
    sink.close()  # the last snapshot's figures
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("esdwatch/phase_map")] == map_steps
    assert sink.phase_spans["l0"] == ("Heavy-Tailed", 1, "Random-like")


def test_phase_table_marks_a_tail_path_estimate():
    from esdwatch import analyze_matrix
    from esdwatch.schema import LayerRecord
    from esdwatch.sinks.dashboard import phases_markdown

    exact = analyze_matrix(make_phase_matrix("Heavy-Tailed", 120, 60), name="exact_layer", traps=False)
    estimated = exact.replace(name="tail_layer", spectrum="tail", estimated="entropy,phase")
    table = phases_markdown([LayerRecord(5, 0, 0.0, r) for r in (exact, estimated)], {}, 5)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "estimate" not in rows["exact_layer"]
    assert "Heavy-Tailed (≈ estimate: tail path)" in rows["tail_layer"]


def test_phase_table_shows_alpha_with_its_error_and_the_best_tail_law_when_fitted():
    from esdwatch import analyze_matrix
    from esdwatch.schema import LayerRecord
    from esdwatch.sinks.dashboard import phases_markdown

    pl = analyze_matrix(make_phase_matrix("Heavy-Tailed", 120, 60), name="pl_layer", traps=False)
    table = phases_markdown([LayerRecord(5, 0, 0.0, pl)], {}, 5)
    assert "best fit" not in table  # fit="PL": no column of empty cells
    assert f"{pl.alpha:.3f} ± {pl.alpha_sigma:.3f}" in table
    tpl = analyze_matrix(make_phase_matrix("Heavy-Tailed", 120, 60), name="tpl_layer", traps=False, fit="TPL")
    assert tpl.best_fit in ("PL", "TPL", "lognormal", "exponential")
    table = phases_markdown([LayerRecord(5, 0, 0.0, r) for r in (tpl, pl.replace(alpha=float("nan")))], {}, 5)
    head, _, tpl_row, pl_row = table.splitlines()
    assert head.endswith("| alpha | best fit |")
    assert tpl_row.endswith(f"| {tpl.alpha:.3f} ± {tpl.alpha_sigma:.3f} | {tpl.best_fit} |")
    assert pl_row.endswith("|  |  |")  # no alpha, no fit: empty cells, never "nan"
