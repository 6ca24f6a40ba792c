"""The quick start: train a small MLP on scikit-learn's digits with ESDMonitor watching.

::

    python -m esdwatch.demo                 # ~8 epochs, well under a minute on 2 CPU cores
    python -m esdwatch.demo --epochs 20 --every-n-steps 10 --worker process

Logs go under ``./esdwatch_logs/demo/version_N/`` (TensorBoard when it is installed, else
CSV); the spectral records are in ``esdwatch/records.jsonl`` there. At the end the demo
prints a per-layer table of the final snapshot (phase, alpha, entropy, stable rank, MP
soft rank), the alarms that fired and the path of ``records.jsonl``.

The module also provides :class:`DigitsMLP` and :class:`DigitsDataModule`, usable with
LightningCLI and ``configs/esdwatch.yaml``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from esdwatch.reporting.summary import fmt, layer_table

try:  # the demo needs one of the two Lightning packages
    import lightning.pytorch as L
except ImportError:  # pragma: no cover - depends on the environment
    import pytorch_lightning as L  # type: ignore[no-redef]  # same API, other package

__all__ = ["DigitsMLP", "DigitsDataModule", "load_digits_tensors", "main", "phase_table"]


def load_digits_tensors(seed: int = 0, val_fraction: float = 0.2):
    """scikit-learn's 8x8 digits as float tensors in [0, 1]: (x_train, y_train, x_val, y_val)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


class DigitsDataModule(L.LightningDataModule):
    """The digits as a LightningDataModule (train / validation split).

    Args:
        batch_size: training batch size.
        seed: seed of the train/validation split and of the shuffling.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self._data = None

    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            self._data = load_digits_tensors(self.seed)

    def train_dataloader(self):
        x, y, _, _ = self._data
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self):
        _, _, x, y = self._data
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=512)


class DigitsMLP(L.LightningModule):
    """An MLP 64 -> hidden... -> 10 for the digits.

    Args:
        hidden: widths of the hidden layers (each >= 50 so its matrix is analysable).
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(self, hidden: Sequence[int] = (256, 256, 128), lr: float = 0.1, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        widths = [64, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 10))
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


#: the end-of-run table, shared with the monitor's summary (esdwatch.reporting.summary)
phase_table = layer_table
_fmt = fmt


def _logger(out: Path):
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        from importlib import import_module

        loggers = import_module(L.__name__ + ".loggers")
        return loggers.TensorBoardLogger(str(out), name="demo")
    from importlib import import_module

    return import_module(L.__name__ + ".loggers").CSVLogger(str(out), name="demo")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esdwatch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--every-n-steps", type=int, default=15, help="snapshot interval in optimizer steps")
    parser.add_argument("--worker", choices=("thread", "process"), default="thread")
    parser.add_argument("--out", default="esdwatch_logs", help="log root directory (default ./esdwatch_logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training (default 1: a tiny MLP gains nothing from more, "
        "and the analysis worker gets a core)",
    )
    args = parser.parse_args(argv)

    from esdwatch.integrations.lightning import callback_class
    from esdwatch.rundir import read_alarms, read_records

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    logger = _logger(out)
    monitor = callback_class("pytorch_lightning" if L.__name__ == "pytorch_lightning" else "lightning")(
        every_n_steps=args.every_n_steps,
        at_start=True,
        at_end=True,
        worker=args.worker,
        # training runs on --threads cores (1 by default), leaving a core to the worker: no need to
        # lower its priority, and the demo shows every snapshot
        worker_nice=0 if args.threads == 1 else 10,
        # spectra for TensorBoard's histograms and the ESD figures (and the phase map) every 5 snapshots
        keep_evals=True,
        sink_options={"figure_every": 5},
        verbose=False,  # the demo prints its own summary below
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    model, data = DigitsMLP(), DigitsDataModule(seed=args.seed)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - t0

    mon = monitor.monitor
    path = mon.records_path if mon is not None else None
    if path is None or not path.exists():
        print("esdwatch demo: no records were written", file=sys.stderr)
        return 1
    records = read_records(path)
    last = max(r.global_step for r in records)
    final = [r for r in records if r.global_step == last]
    steps = sorted({r.global_step for r in records})
    acc = trainer.callback_metrics.get("val/acc")
    print()
    print(
        f"esdwatch demo: {args.epochs} epochs, {trainer.global_step} steps in {elapsed:.1f} s"
        + (f", validation accuracy {float(acc):.3f}" if acc is not None else "")
    )
    print(f"snapshots at steps {steps} ({int(mon.stats['skipped'])} skipped)")
    print(f"\nper-layer phases at step {last}:")
    print(phase_table(final))
    alarms = read_alarms(path.parent)
    if alarms:
        warnings = sum(a.severity != "info" for a in alarms)
        print(f"\nalarms ({len(alarms)}, {warnings} at warning level or above):")
        for a in alarms:
            print(f"  step {a.step}: {a.severity} [{a.kind}] {a.message}")
    else:
        print("\nno alarms")
    print(f"\nrecords: {path}")
    print(f"logs:    {logger.log_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
