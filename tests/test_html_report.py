"""``esdwatch report``: the static HTML report, from records written by the real sinks,
on a run that was interrupted, resumed and is still being written; rendered in headless
Chromium to check that it shows and that every image it references loads.
"""

from __future__ import annotations

import base64
import html.parser
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from esdwatch import analyze_matrix, cli
from esdwatch.alarms import Alarm
from esdwatch.engine.synthetic import make_phase_matrix
from esdwatch.reporting.figures import PHASE_COLORS
from esdwatch.reporting.html import build_report
from esdwatch.schema import LayerRecord, phase_name
from esdwatch.sinks.jsonl import JsonlSink, read_records
from esdwatch.sinks.spectra import SpectraSink, read_spectra

pytest.importorskip("matplotlib")

CHROMIUM = "/usr/bin/chromium"
LAYERS = ("embed", "block.0.mlp", "head")
# phase of each layer at each step of segment 0, then of the resumed segment 1
SEG0 = {
    0: ("Random-like",) * 3,
    10: ("Random-like", "Bulk+Spikes", "Bulk+Spikes"),
    20: ("Bulk+Spikes", "Bulk-decay", "Heavy-Tailed"),
    30: ("Bulk+Spikes", "Bulk-decay", "Rank-collapse"),
}
SEG1 = {30: ("Bulk+Spikes", "Heavy-Tailed", "Heavy-Tailed"), 40: ("Bulk-decay", "Heavy-Tailed", "Heavy-Tailed")}


def _records(step: int, phases, segment: int) -> list[LayerRecord]:
    return [
        LayerRecord(
            step,
            step // 10,
            1_700_000_000.0 + step,
            analyze_matrix(make_phase_matrix(p, 120, 60, seed=step + i), name=name, keep_evals=True, traps=False),
            segment,
        )
        for i, (name, p) in enumerate(zip(LAYERS, phases))
    ]


def _write(directory: Path, snaps: dict, resumed_from_step=None, alarms=()):
    jsonl = JsonlSink(directory, resumed_from_step=resumed_from_step).open()
    spectra = SpectraSink(directory)
    for step, phases in snaps.items():
        recs = _records(step, phases, jsonl.segment)
        jsonl.write(recs, step)
        spectra.write(recs, step)
    for alarm in alarms:
        jsonl.alarm(alarm)
    jsonl.close()
    spectra.close()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A run interrupted after step 30, resumed from its step-20 checkpoint, still writing."""
    root = tmp_path_factory.mktemp("run") / "version_3"
    out = root / "esdwatch"
    _write(
        out,
        SEG0,
        alarms=[
            Alarm("rank_collapse", "head", 0.8, 0.5, "head: rank collapse <b>", "error", 20),
            Alarm("alpha_low", "embed", 1.9, 2.0, "superseded alarm", step=30),
        ],
    )
    _write(
        out,
        SEG1,
        resumed_from_step=20,
        alarms=[Alarm("alpha_low", "block.0.mlp", 1.8, 2.0, "block.0.mlp: alpha = 1.8 < 2", step=40)],
    )
    with open(out / "records.jsonl", "ab") as fh:  # the next snapshot, half written
        fh.write(b'{"global_step": 50, "epoch": 5, "wall_ti')
    return root


class Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _srcs(page: Path) -> list[str]:
    p = Images()
    p.feed(page.read_text(encoding="utf-8"))
    return p.srcs


def test_spectra_file_follows_the_segment_rules(run_root):
    spectra = read_spectra(run_root / "esdwatch")
    assert sorted({s for s, _ in spectra}) == [0, 10, 20, 30, 40]
    assert set(n for _, n in spectra) == set(LAYERS)
    assert all(h.counts.sum() == 60 for h in spectra.values())


def test_report_command_writes_a_page_and_its_figures(run_root, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", str(run_root), "--output", str(out)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == out / "index.html"
    text = page.read_text(encoding="utf-8")

    srcs = _srcs(page)
    assert srcs[:4] == ["phase_map.png", "alpha.png", "entropy.png", "mp_softrank.png"]
    assert srcs[4:] == [f"esd_{i:03d}_{n}.png" for i, n in enumerate(LAYERS)]
    for src in srcs:
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # every file renamed into place

    # the superseded step 30 of the interrupted segment is gone, the half-written line skipped
    assert "5 snapshots, global steps 0 to 40; 3 layers; run segments 0, 1" in text
    assert "<h2>Latest snapshot (step 40)</h2>" in text
    latest = [r for r in read_records(run_root / "esdwatch") if r.global_step == 40]
    assert [r.segment for r in latest] == [1, 1, 1]
    for rec in latest:
        phase, alpha = phase_name(rec.report.phase), f"{rec.report.alpha:.3f}"
        assert re.search(rf"<td class='l'>{re.escape(rec.name)}</td>.*?{re.escape(phase)}</td><td>{alpha}</td>", text)
    # the alarms that stand, escaped, in order (the interrupted segment's step-30 one is gone)
    assert "superseded alarm" not in text
    assert "Alarms (2)" in text and "head: rank collapse &lt;b&gt;" in text
    assert text.index("rank collapse &lt;b&gt;") < text.index("block.0.mlp: alpha = 1.8 &lt; 2")
    assert "recorded no spectra" not in text
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")


def test_embed_makes_one_self_contained_file(run_root, tmp_path):
    page = build_report(run_root / "esdwatch" / "records.jsonl", tmp_path / "one", embed=True, max_layers=1)
    srcs = _srcs(page)
    assert len(srcs) == 5  # phase map, 3 trajectories, 1 ESD (max_layers=1)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "2 more layers not drawn" in page.read_text(encoding="utf-8")


def test_report_without_spectra_draws_fits_and_says_so(tmp_path):
    out = tmp_path / "esdwatch"
    jsonl = JsonlSink(out).open()
    recs = _records(0, ("Heavy-Tailed",) * 3, jsonl.segment)
    jsonl.write([LayerRecord(r.global_step, 0, r.wall_time, r.report.replace(evals=None)) for r in recs], 0)
    jsonl.close()
    page = build_report(tmp_path)
    assert page == out / "report" / "index.html"
    assert "recorded no spectra" in page.read_text(encoding="utf-8")
    assert len(_srcs(page)) == 4 + 3


def test_report_marks_the_estimates_of_tail_path_layers(tmp_path):
    from esdwatch.engine.synthetic import power_law_spikes

    out = tmp_path / "esdwatch"
    jsonl = JsonlSink(out).open()
    W = power_law_spikes(2048, 2048, num_spikes=60, dtype=torch.float32)
    tail = analyze_matrix(W, name="big", spectrum="tail", traps=False)
    exact = analyze_matrix(make_phase_matrix("Heavy-Tailed", 120, 60), name="small", traps=False)
    assert tail.spectrum == "tail" and "entropy" in tail.estimated.split(",")
    jsonl.write([LayerRecord(0, 0, 1_700_000_000.0, rep) for rep in (tail, exact)], 0)
    jsonl.close()
    text = build_report(tmp_path).read_text(encoding="utf-8")
    rows = [row.split("</tr>")[0] for row in text.split("<tr>")]
    big_row = next(row for row in rows if row.startswith("<td class='l'>big</td>"))
    small_row = next(row for row in rows if row.startswith("<td class='l'>small</td>"))
    assert big_row.count("&asymp;") == 4  # phase, entropy, soft rank, spikes (no trap test run)
    assert "&asymp;" not in small_row
    assert "marks an estimate" in text


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such file or directory"),
        ("empty_dir", "no records.jsonl in this directory"),
        ("no_records", "no records yet"),
        ("two_runs", "2 runs below this directory"),
    ],
)
def test_report_errors_are_one_line_and_exit_2(tmp_path, capsys, setup, message):
    target = tmp_path / "logs"
    if setup != "missing":
        target.mkdir()
    if setup == "no_records":
        (target / "records.jsonl").write_text('{"global_step": 0, "na')  # a first line, half written
    if setup == "two_runs":
        for v in ("version_0", "version_1"):
            (target / v / "esdwatch").mkdir(parents=True)
            (target / v / "esdwatch" / "records.jsonl").write_text("")
    assert cli.main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("esdwatch: error: ") and message in err


# --------------------------------------------------------------- a real browser


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    profile = cwd / "chromium-profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to render "
    "the report in a real browser",
)
def test_report_renders_in_headless_chromium_with_every_image_loaded(run_root, tmp_path):
    import matplotlib.image

    page = build_report(run_root, tmp_path / "report")
    # every <img> of the page, as the browser loaded it: a copy of the page that records,
    # on load, how many images decoded (complete with a natural size)
    probe = page.with_name("probe.html")
    script = (
        "<script>window.addEventListener('load',()=>{const im=[...document.images];"
        "document.body.setAttribute('data-total',im.length);"
        "document.body.setAttribute('data-loaded',im.filter(i=>i.complete&&i.naturalWidth>0).length);"
        "document.body.setAttribute('data-broken',im.filter(i=>!(i.complete&&i.naturalWidth>0))"
        ".map(i=>i.getAttribute('src')).join(' '));});</script>"
    )
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    total = int(re.search(r'data-total="(\d+)"', dom.stdout).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', dom.stdout).group(1))
    assert total == len(_srcs(page)) == 7
    assert loaded == total, re.search(r'data-broken="([^"]*)"', dom.stdout).group(1)

    shot = tmp_path / "report.png"
    res = _chromium("--window-size=1200,1600", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05  # not a blank page
    rgb = (pixels * 255).round().astype(int).reshape(-1, 3)
    seen = Counter(phase_name(r.report.phase) for r in read_records(run_root))
    for phase, _ in seen.most_common(2):  # the phase map and the table chips are on screen
        want = np.array([int(PHASE_COLORS[phase][i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - want).max(axis=1) <= 4).sum() > 200, phase
    if os.environ.get("ESDWATCH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ESDWATCH_KEEP_SCREENSHOT"])
