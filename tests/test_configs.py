"""The LightningCLI examples in configs/: each parses with LightningCLI and does what it says
when the parsed Trainer trains (a few steps of the digits demo model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--trainer.max_steps=12",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=32",
    "--model.hidden=[64, 64]",
    # test-sized schedule: every 2 steps, never skipping a snapshot
    "--trainer.callbacks.init_args.every_n_steps=2",
    "--trainer.callbacks.init_args.execution.on_backpressure=block",
]


def _cli(config: str, *args: str):
    from lightning.pytorch.cli import LightningCLI

    from esdwatch.demo import DigitsDataModule, DigitsMLP

    return LightningCLI(
        DigitsMLP,
        DigitsDataModule,
        run=False,
        save_config_callback=None,
        args=["--config", str(ROOT / "configs" / config), *args],
    )


def _monitor(cli):
    from esdwatch.lightning import ESDMonitorBase

    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, ESDMonitorBase)]
    return cb


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli"])  # pytest's own arguments are not the CLI's


def test_live_dashboard_config_writes_spectra_every_snapshot_and_figures_every_5(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from esdwatch.sinks import read_records

    torch.manual_seed(0)
    cli = _cli(
        "live_dashboard.yaml",
        *COMMON,
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'lightning_logs'}",
        "--trainer.enable_checkpointing=false",
    )
    cb = _monitor(cli)
    (logger,) = cli.trainer.loggers
    assert isinstance(logger, TensorBoardLogger) and logger.name == "live"
    assert cb.options.keep_evals is True and cb.options.at_start is True
    assert cb.framework.sink_options == {"figure_every": 5, "hist_bins": 64, "max_esd_figures": 16}

    cli.trainer.fit(cli.model, cli.datamodule)
    steps = sorted({r.global_step for r in read_records(logger.log_dir)})
    assert steps == [0, 2, 4, 6, 8, 10, 12]
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    for name in ("net.0", "net.2"):
        assert [e.step for e in ea.Histograms(f"esdwatch/esd_log10_eigenvalues/{name}")] == steps
        assert all(len(e.histogram_value.bucket) == 65 for e in ea.Histograms(f"esdwatch/esd_log10_eigenvalues/{name}"))
    # the 1st and 6th snapshots (figure_every=5), and the last one at the end of fit
    assert [e.step for e in ea.Images("esdwatch/phase_map")] == [0, 10, 12]
    assert [e.step for e in ea.Images("esdwatch/esd_figure/net.2")] == [0, 10, 12]
    assert len(ea.Tensors("custom_scalars__config__")) == 1


def test_long_run_guard_config_stops_training_on_rank_collapse(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from esdwatch.sinks import read_alarms, read_records

    cli = _cli(
        "long_run_guard.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        *[a.replace("max_steps=12", "max_steps=40") for a in COMMON],
    )
    cb = _monitor(cli)
    kw = {**vars(cb.options), **vars(cb.options.analysis)}  # the options, the analysis group flat
    # as written in the file (before the test's schedule override)
    raw = _cli("long_run_guard.yaml", f"--trainer.default_root_dir={tmp_path}")
    assert _monitor(raw).every_n_steps == "auto" and _monitor(raw).options.max_overhead == 0.02
    assert kw["traps"] is True
    assert kw["alarm_actions"] == {
        "rank_collapse": "stop",
        "new_traps": "stop",
        "non_finite": "stop",
        "alpha_low": "warn",
        "alpha_high": "warn",
    }
    assert kw["alarm_patience"] == {"rank_collapse": 2, "new_traps": 2, "non_finite": 1}
    (ckpt,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert ckpt.save_last is True

    # a collapsed layer: net.2 is rank one and frozen, so every snapshot sees it collapsed
    torch.manual_seed(0)
    w = cli.model.net[2].weight
    with torch.no_grad():
        w.copy_(torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1])) * 0.1)
    w.requires_grad_(False)
    cli.trainer.fit(cli.model, cli.datamodule)

    log_dir = Path(cb.monitor.output_dir)
    alarms = [a for a in read_alarms(log_dir) if a.kind == "rank_collapse"]
    assert [(a.layer, a.step) for a in alarms] == [("net.2", 2)]  # patience 2: snapshots at steps 0 and 2
    assert cli.trainer.global_step < 40  # stopped by the guard, not by max_steps
    assert max(r.global_step for r in read_records(log_dir)) <= cli.trainer.global_step
