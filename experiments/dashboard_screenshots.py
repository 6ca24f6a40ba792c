"""Screenshots of esdwatch's dashboards on the demo run, for the README.

Trains the README demo (``esdwatch.demo``: an MLP on scikit-learn's digits, same model,
data, schedule and seed) with the eigenvalues handed to the sinks (``keep_evals=True``,
so TensorBoard gets spectra and ESD figures, and ``spectra.jsonl`` is written for the
report), serves the run with the real ``tensorboard`` on 127.0.0.1, and takes headless
Chromium screenshots of TensorBoard's UI and of ``esdwatch report``'s page::

    python experiments/dashboard_screenshots.py            # writes experiments/results/*.png

Outputs (downscaled, palette PNGs to keep the repository small):
``tensorboard_scalars.png`` (Custom Scalars at smoothing 0 with outliers kept: the phase
chart of each layer, then every layer's alpha and entropy), ``tensorboard_phases.png``
(Text tab: every alarm, and the phase table: each layer's phase, since which step, the
one before), ``tensorboard_histograms.png`` (the ESD of each layer over steps, log10 eigenvalues),
``tensorboard_phase_map.png`` (Images: the phase map), ``report.png`` (the HTML report).
Needs tensorboard, matplotlib, Pillow and ``/usr/bin/chromium`` (Debian's ``chromium``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def train(out: Path, epochs: int, every: int) -> Path:
    """The demo's training run, with keep_evals=True and the spectra sink; returns its log_dir."""
    import torch

    from esdwatch.demo import DigitsDataModule, DigitsMLP, L
    from esdwatch.lightning import callback_class
    from esdwatch.sinks.spectra import SpectraSink

    torch.manual_seed(0)
    torch.set_num_threads(1)
    logger = importlib.import_module(L.__name__ + ".loggers").TensorBoardLogger(str(out), name="demo")
    log_dir = Path(logger.log_dir)
    monitor = callback_class("lightning" if L.__name__ != "pytorch_lightning" else "pytorch_lightning")(
        every_n_steps=every,
        at_start=True,
        at_end=True,
        keep_evals=True,
        on_backpressure="block",
        sinks=[SpectraSink(log_dir / "esdwatch")],
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule(seed=0))
    return log_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def chromium(
    url: str, png: Path, width: int, height: int, profile: Path, budget_ms: int = 15000, scale: float = 1.0
) -> None:
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--force-device-scale-factor={scale}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def preset_local_storage(port: int, profile: Path, items: dict[str, str]) -> None:
    """Set TensorBoard UI settings that live in the browser's localStorage (not in the URL),
    such as "Ignore outliers in chart scaling": a page served on the same origin
    (127.0.0.1:port) sets them in the Chromium profile the screenshots then use."""
    import http.server
    import threading

    script = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())
    body = f"<html><body><script>{script}document.title='set'</script></body></html>".encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", port), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--dump-dom"]
            + [f"http://127.0.0.1:{port}/"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


def shrink(src: Path, dst: Path, width: int, crop: tuple[int, int, int, int] | None = None) -> None:
    """Crop, downscale to ``width`` pixels and store as a 256-color palette PNG."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if crop:
        img = img.crop(crop)
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)
    print(f"wrote {dst} ({dst.stat().st_size // 1024} kB, {img.width}x{img.height})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="log root (default: a temporary directory)")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--every-n-steps", type=int, default=15)
    parser.add_argument("--width", type=int, default=1100, help="width of the saved PNGs")
    parser.add_argument("--reuse", default=None, help="a log_dir of an earlier run: take the screenshots only")
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esdwatch-shots-"))
    out = Path(args.out) if args.out else work / "logs"
    log_dir = Path(args.reuse) if args.reuse else train(out, args.epochs, args.every_n_steps)
    print(f"trained: {log_dir}")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # what a user would set once in the UI: every point of the phase charts on the y axis
    preset_local_storage(port, work / "profile", {"_ignoreYOutliers": "false"})
    exe = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or "tensorboard"
    server = subprocess.Popen(
        [exe, "--logdir", str(log_dir.parent), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if "esdwatch/phase_map" in json.dumps(get_json(f"{base}/data/plugin/images/tags")):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("tensorboard did not serve the run")
            time.sleep(1)
        raw = work / "raw"
        raw.mkdir()
        # (name, URL, window width and height in CSS px, device scale, crop box in CSS px)
        shots = [
            ("tensorboard_scalars", f"{base}/#custom_scalars&_smoothingWeight=0", 1400, 1000, 1, None),
            ("tensorboard_phases", f"{base}/#text&tagFilter=phases%7Calarms", 1400, 1000, 1, None),
            ("tensorboard_histograms", f"{base}/#histograms&tagFilter=esd_log10", 1400, 1000, 1, None),
            # TensorBoard draws images in ~350 px cards: render at 2x and keep the cards' region
            ("tensorboard_phase_map", f"{base}/#images&tagFilter=phase_map", 1400, 1000, 2, (300, 0, 1120, 620)),
        ]
        for name, url, w, h, scale, crop in shots:
            chromium(url, raw / f"{name}.png", w, h, work / "profile", scale=scale)
            box = tuple(int(v * scale) for v in crop) if crop else None
            shrink(raw / f"{name}.png", results / f"{name}.png", args.width, box)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    from esdwatch.reporting.html import build_report

    page = build_report(log_dir, work / "report", title="esdwatch report: the demo run (digits MLP)")
    chromium(page.as_uri(), raw / "report.png", 1200, 2260, work / "profile", budget_ms=5000)
    shrink(raw / "report.png", results / "report.png", args.width)
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
