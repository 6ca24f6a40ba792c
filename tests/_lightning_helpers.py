"""The Lightning fixtures shared by test_lightning_callback.py, test_resume.py and test_ddp.py.

One tiny model and its data, a callback that edits the weights after each optimizer
step, and a quiet CPU Trainer, for either Lightning package. ``lightning.pytorch`` and
``pytorch_lightning`` are separate class hierarchies (a Trainer of one rejects the
other's modules and callbacks), so each class exists once per package, built on first
access and kept as a module attribute (``LightningNet`` / ``PLNet``, ``LightningAfterStep``
/ ``PLAfterStep``): ``ddp_spawn`` pickles the module by reference, and a class the child
process can import by name is what makes that work. Importing this module imports
neither package.

The default model has two analysable matrices at ``min_evals=8``: ``net.0`` (32 x 24)
and ``net.2`` (32 x 32); ``net.4`` (4 x 32) has M=4 and is skipped. The data is 256
fixed samples in batches of 16 (16 optimizer steps per epoch, no shuffling), so every
run of the same schedule sees the same weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

LIGHTNING = "lightning.pytorch"
PL = "pytorch_lightning"

#: widths of the default model (test_lightning_callback, test_resume)
WIDTHS = (24, 32, 32, 4)
#: test_ddp's model: three analysable matrices of different costs, so the ranks split them unevenly
DDP_WIDTHS = (24, 64, 48, 32, 4)
BATCHES_PER_EPOCH = 16

#: Trainer arguments of every test run: CPU, one device, nothing printed or saved unless asked
QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)


def mlp(widths: Sequence[int] = WIDTHS) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between two of them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def data(n: int = 256, batch_size: int = 16) -> torch.utils.data.DataLoader:
    """``n`` fixed Gaussian samples of 24 features, 4 classes; not shuffled."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 24, generator=g), torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class _NetBody:
    """The LightningModule's body (mixed into each package's LightningModule).

    ``raise_at``: raise ``exc`` in ``training_step`` once ``global_step`` equals it (an
    interrupted run).
    """

    def __init__(
        self, widths: Sequence[int] = WIDTHS, raise_at: int | None = None, exc: type[BaseException] = RuntimeError
    ):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(widths)
        self.raise_at, self.exc = raise_at, exc

    def training_step(self, batch, batch_idx):
        if self.raise_at is not None and self.global_step == self.raise_at:
            raise self.exc("interrupted by the test")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return data()


class _AfterStepBody:
    """Runs ``fn(trainer, module)`` (under ``no_grad``) once after each optimizer step.

    List it before ESDMonitor: it then edits the weights before the snapshot of that step.
    """

    def __init__(self, fn: Callable[[Any, Any], None]):
        super().__init__()
        self.fn = fn
        self.last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            with torch.no_grad():
                self.fn(trainer, pl_module)


#: class name -> (package, base class in it, body)
_CLASSES: dict[str, tuple[str, str, type]] = {
    "LightningNet": (LIGHTNING, "LightningModule", _NetBody),
    "PLNet": (PL, "LightningModule", _NetBody),
    "LightningAfterStep": (LIGHTNING, "Callback", _AfterStepBody),
    "PLAfterStep": (PL, "Callback", _AfterStepBody),
}


def __getattr__(name: str) -> type:
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    package, base, body = _CLASSES[name]
    cls = type(
        name,
        (body, getattr(importlib.import_module(package), base)),
        {"__module__": __name__, "__qualname__": name, "__doc__": body.__doc__},
    )
    globals()[name] = cls
    return cls


def _prefix(framework: str) -> str:
    if framework in ("lightning", LIGHTNING):
        return "Lightning"
    if framework == PL:
        return "PL"
    raise ValueError(f"framework must be {LIGHTNING!r} or {PL!r}, got {framework!r}")


def _cls(name: str) -> type:
    return globals().get(name) or __getattr__(name)


def net_class(framework: str = LIGHTNING) -> type:
    """``LightningNet`` or ``PLNet``."""
    return _cls(_prefix(framework) + "Net")


def net(framework: str = LIGHTNING, **kwargs: Any) -> Any:
    """A fresh model (seeded: identical weights every time) of ``framework``'s LightningModule."""
    return net_class(framework)(**kwargs)


def after_step(fn: Callable[[Any, Any], None], framework: str = LIGHTNING) -> Any:
    """A callback running ``fn(trainer, module)`` once after each optimizer step (see ``_AfterStepBody``)."""
    return _cls(_prefix(framework) + "AfterStep")(fn)


def collapse_from(step: int, rank: int = 2, layer: int = 2) -> Callable[[Any, Any], None]:
    """For :func:`after_step`: from ``step`` on, project ``net[layer]`` (32 inputs) onto a fixed
    rank-``rank`` subspace."""
    torch.manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, rank))
    proj = basis @ basis.T

    def fn(trainer, module):
        if trainer.global_step >= step:
            w = module.net[layer].weight
            w.copy_(w @ proj)

    return fn


def trainer(root: str | Path, callbacks: Iterable[Any] = (), framework: str = LIGHTNING, **kwargs: Any) -> Any:
    """A quiet CPU Trainer (:data:`QUIET`) writing under ``root``; ``kwargs`` override anything."""
    L = importlib.import_module(LIGHTNING if _prefix(framework) == "Lightning" else PL)
    args = dict(QUIET, default_root_dir=str(root))
    args.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **args)
