"""TensorBoard as a user sees it: a real ``tensorboard`` server over a real Trainer run,
queried through its HTTP data API on 127.0.0.1, then stopped by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")

from _sink_helpers import fit_digits
from esdwatch.engine.phases import Phase  # noqa: E402
from esdwatch.sinks import read_records  # noqa: E402

RUN = "version_0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(root: Path) -> Path:
    from lightning.pytorch.loggers import TensorBoardLogger

    from esdwatch.lightning import ESDMonitor

    torch.manual_seed(0)
    logger = TensorBoardLogger(str(root), name="run")
    monitor = ESDMonitor(every_n_steps=5, at_start=True, keep_evals=True, traps=False, on_backpressure="block")
    fit_digits(logger, monitor, max_steps=15)
    return Path(logger.log_dir)


class Server:
    def __init__(self, logdir: Path, log_file: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
        cmd += ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(self.port), "--reload_interval", "1"]
        self.log = open(log_file, "wb")
        # own session: the test stops the server and its data-server child by process group
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )

    def get(self, path: str, **params) -> bytes:
        url = f"{self.base}{path}" + (("?" + urllib.parse.urlencode(params)) if params else "")
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200, url
            return resp.read()

    def json(self, path: str, **params):
        return json.loads(self.get(path, **params))

    def wait_for(self, predicate, what: str, deadline_s: float = 120.0):
        """Poll until ``predicate()`` is truthy (a liveness deadline, not a timing assertion)."""
        end = time.monotonic() + deadline_s
        last_error = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {self.proc.returncode} while waiting for {what}")
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, ValueError, KeyError) as exc:
                last_error = exc
            time.sleep(0.5)
        pytest.fail(f"tensorboard never served {what} (last error: {last_error})")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tbserver")
    log_dir = _fit(root)
    server = Server(log_dir.parent, root / "tensorboard.log")
    try:
        server.wait_for(
            lambda: (
                {"esdwatch/alpha/net.0", "esdwatch/phase/net.2"}
                <= set(server.json("/data/plugin/scalars/tags").get(RUN, {}))
                and "esdwatch/esd_log10_eigenvalues/net.0" in server.json("/data/plugin/histograms/tags").get(RUN, {})
                and "esdwatch/phase_map" in server.json("/data/plugin/images/tags").get(RUN, {})
            ),
            "esdwatch's scalars, histograms and images",
        )
        yield server, read_records(log_dir)
    finally:
        server.stop()
        assert server.proc.poll() is not None


def test_scalars_dashboard_serves_every_layer_series_with_the_recorded_values(served):
    server, records = served
    assert server.json("/data/runs") == [RUN]
    tags = server.json("/data/plugin/scalars/tags")[RUN]
    for name in ("net.0", "net.2"):
        for metric in ("alpha", "entropy", "mp_softrank", "stable_rank", "phase"):
            assert f"esdwatch/{metric}/{name}" in tags
    assert "esdwatch/summary/alpha" in tags and "train/loss" in tags
    for name in ("net.0", "net.2"):
        series = server.json("/data/plugin/scalars/scalars", run=RUN, tag=f"esdwatch/alpha/{name}")
        got = {step: value for _wall, step, value in series}
        want = {r.global_step: r.report.alpha for r in records if r.name == name}
        assert sorted(got) == sorted(want) == [0, 5, 10, 15]
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-6)
        phases = {
            step: value
            for _w, step, value in server.json("/data/plugin/scalars/scalars", run=RUN, tag=f"esdwatch/phase/{name}")
        }
        assert phases == {r.global_step: float(Phase.parse(r.report.phase).order) for r in records if r.name == name}


def test_custom_scalars_layout_groups_all_layers(served):
    server, _ = served
    layout = server.json("/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
    assert charts["alpha"]["multiline"]["tag"] == ["^esdwatch/alpha/"]
    assert charts["entropy"]["multiline"]["tag"] == ["^esdwatch/entropy/"]
    assert charts["mp_softrank"]["multiline"]["tag"] == ["^esdwatch/mp_softrank/"]
    titles = [cat["title"] for cat in layout["category"]]
    assert titles[1:] == ["esdwatch: all layers", "esdwatch: model"]
    # first, the phase of each layer in a chart of its own, the scale by name in the title
    assert titles[0].startswith("esdwatch: phase per layer (0 Random-like, 1 Bleeding-out, 2 Bulk+Spikes")
    per_layer = {c["title"]: c["multiline"]["tag"] for c in layout["category"][0]["chart"]}
    assert per_layer == {"phase: net.0": [r"^esdwatch/phase/net\.0$"], "phase: net.2": [r"^esdwatch/phase/net\.2$"]}


def test_histograms_dashboard_serves_the_spectra_per_snapshot(served):
    server, _ = served
    tags = server.json("/data/plugin/histograms/tags")[RUN]
    assert {"esdwatch/esd_log10_eigenvalues/net.0", "esdwatch/esd_log10_eigenvalues/net.2"} <= set(tags)
    for name in ("net.0", "net.2"):
        series = server.json(
            "/data/plugin/histograms/histograms", run=RUN, tag=f"esdwatch/esd_log10_eigenvalues/{name}"
        )
        assert [step for _wall, step, _buckets in series] == [0, 5, 10, 15]
        for _wall, _step, buckets in series:
            # [left, right, count] buckets over log10 eigenvalues: every one of the 64
            assert sum(b[2] for b in buckets) == pytest.approx(64)
            assert all(left <= right for left, right, _ in buckets)


def test_images_dashboard_serves_the_phase_map_and_esd_figures(served):
    server, _ = served
    tags = server.json("/data/plugin/images/tags")[RUN]
    assert {"esdwatch/phase_map", "esdwatch/esd_figure/net.0", "esdwatch/esd_figure/net.2"} <= set(tags)
    entries = server.json("/data/plugin/images/images", run=RUN, tag="esdwatch/phase_map")
    assert [e["step"] for e in entries] == [0, 15]
    png = server.get("/data/plugin/images/individualImage?" + entries[-1]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_text_dashboard_serves_the_per_layer_table(served):
    server, records = served
    tag = "esdwatch/layers/text_summary"  # torch's add_text appends /text_summary
    assert tag in server.json("/data/plugin/text/tags")[RUN]
    entries = server.json("/data/plugin/text/text", run=RUN, tag=tag)
    assert [e["step"] for e in entries] == [0, 5, 10, 15]
    last = entries[-1]["text"]
    for rec in (r for r in records if r.global_step == 15):
        assert rec.name in last and rec.report.phase in last
