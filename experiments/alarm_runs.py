"""The training runs of the alarm lead-time experiment (issue 16): a plain loop with the monitor attached.

Each run is a small MLP on scikit-learn's digits trained in a plain PyTorch loop with
:class:`esdwatch.monitor.Monitor` at its defaults (only ``every_n_steps`` and ``log_dir``
set), so its alarms are exactly what a user would get. Besides the monitor's own files
(``records.jsonl``, ``alarms.jsonl`` under ``<log_dir>/esdwatch/``) a run writes
``metrics.jsonl``: step, loss, train and test accuracy every ``eval_every`` steps.
The rules can then be re-evaluated offline on the recorded LayerReport history
(:func:`esdwatch.rundir.read_records`) without training again.

A *scenario* is the run plus an ``event``: a callable ``(step, net, optimizer) -> None``
called after every optimizer step that perturbs the run at a known step (a learning-rate spike, a
penalty that kills units, a re-initialised layer). Its healthy twin is the same run with
no event.

Also runnable on its own for the long anti-grokking run::

    python experiments/alarm_runs.py anti_grokking --steps 300000 --log-dir /tmp/ag
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Event = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def digits(n_train: int | None = None, seed: int = 0):
    """Digits scaled to [0, 1]; ``n_train`` samples for training (default 75 %), the rest for test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234 + seed))
    n = n_train if n_train is not None else int(round(0.75 * len(x)))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


class MLP(nn.Module):
    """64 -> hidden... -> 10 with ReLU; layers ``fc1``, ``fc2``, ..."""

    def __init__(self, sizes: list[int], init_scale: float = 1.0):
        super().__init__()
        self.names: list[str] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            lin = nn.Linear(a, b)
            if init_scale != 1.0:
                with torch.no_grad():
                    lin.weight.mul_(init_scale)
                    lin.bias.mul_(init_scale)
            setattr(self, f"fc{i}", lin)
            self.names.append(f"fc{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)


@dataclass
class RunConfig:
    """One training run."""

    name: str
    sizes: list[int]
    steps: int
    lr: float
    every_n_steps: int
    eval_every: int
    batch: int = 64
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) | "adamw"
    weight_decay: float = 0.0
    loss: str = "ce"  # "ce" | "mse" (one-hot targets, the grokking setting)
    init_scale: float = 1.0
    n_train: int | None = None
    seed: int = 0
    monitor: dict[str, Any] = field(default_factory=dict)


def _make_optimizer(cfg: RunConfig, net: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _loss(cfg: RunConfig, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "mse":
        return ((out - nn.functional.one_hot(y, out.shape[1]).float()) ** 2).sum(1).mean()
    return nn.functional.cross_entropy(out, y)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


def train(cfg: RunConfig, log_dir: Path, event: Event | None = None, quiet: bool = True) -> Path:
    """Train ``cfg`` with the monitor at its defaults; returns ``log_dir`` (records, alarms, metrics.jsonl)."""
    from esdwatch.monitor import Monitor

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    xtr, ytr, xte, yte = digits(cfg.n_train, cfg.seed)
    net = MLP(cfg.sizes, cfg.init_scale)
    opt = _make_optimizer(cfg, net)
    gen = torch.Generator().manual_seed(cfg.seed)
    mon = Monitor(net, every_n_steps=cfg.every_n_steps, at_start=True, log_dir=log_dir, verbose=False, **cfg.monitor)
    mon.start()
    metrics = (log_dir / "metrics.jsonl").open("w", encoding="utf-8")
    t0 = time.perf_counter()
    perm = torch.randperm(len(xtr), generator=gen)
    pos = 0
    try:
        for step in range(1, cfg.steps + 1):
            if pos + cfg.batch > len(xtr):
                perm, pos = torch.randperm(len(xtr), generator=gen), 0
            idx = perm[pos : pos + cfg.batch]
            pos += cfg.batch
            loss = _loss(cfg, net(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if event is not None:  # after the update, so the snapshot of this step sees it
                event(step, net, opt)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                lv = float(loss.detach())
                row = {
                    "step": step,
                    "loss": lv if math.isfinite(lv) else None,
                    "train_acc": accuracy(net, xtr, ytr),
                    "test_acc": accuracy(net, xte, yte),
                    "wall": round(time.perf_counter() - t0, 2),
                }
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if not quiet:
                    print(json.dumps(row), flush=True)
            mon.step(step)
    finally:
        metrics.close()
        mon.close()
    return log_dir


def anti_grokking(steps: int, every_n_steps: int, eval_every: int) -> RunConfig:
    """Prakash & Martin 2025 (arXiv 2506.04434): depth-3 width-200 MLP, 1,000 samples, init x8, no weight decay.

    The Omnigrok setting (Liu et al. 2023): MSE loss on one-hot targets, AdamW lr 1e-3,
    batch 200, initialisation scaled by 8; weight decay 0 (anti-grokking) instead of the
    grokking runs' 0.01.
    """
    return RunConfig(
        name="anti_grokking",
        sizes=[64, 200, 200, 10],
        steps=steps,
        lr=1e-3,
        every_n_steps=every_n_steps,
        eval_every=eval_every,
        batch=200,
        optimizer="adamw",
        weight_decay=0.0,
        loss="mse",
        init_scale=8.0,
        n_train=1000,
    )


# ------------------------------------------------------------------ the failure scenarios

#: the base run of the three short scenarios and of their healthy twin: the README demo's MLP
#: (64 -> 256 -> 256 -> 128 -> 10: three analysed matrices; the classifier is below the
#: 50-eigenvalue floor), SGD with momentum, about 1.5 ms a step on one core
BASE = dict(sizes=[64, 256, 256, 128, 10], lr=0.05, batch=32, eval_every=25)


def base(name: str, steps: int, every: int, seed: int = 0) -> RunConfig:
    return RunConfig(name=name, steps=steps, every_n_steps=every, seed=seed, **BASE)  # type: ignore[arg-type]


def rank_collapse_event(start: int, layer: str = "fc2", rate: float = 2e-6) -> Event:
    """From ``start`` on, a growing group-lasso penalty on the rows (units) of ``layer``.

    Its proximal step after each update, row <- row * max(0, 1 - t / ||row||) with
    t = rate * (step - start), sets a unit's incoming weights exactly to zero once
    their norm falls below t: units die one after another (rank collapse of the layer).
    """

    def event(step: int, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        if step <= start:
            return
        w = getattr(net, layer).weight
        with torch.no_grad():
            t = rate * (step - start)
            norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            w.mul_((1.0 - t / norms).clamp_min(0.0))

    return event


def lr_spike_event(start: int, growth: float = 1.003, cap: float = 50.0) -> Event:
    """From ``start`` on the learning rate grows by ``growth`` a step, up to ``cap`` x its value (a schedule bug)."""
    state: dict[str, float] = {}

    def event(step: int, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        if step <= start:
            return
        for g in opt.param_groups:
            lr0 = state.setdefault("lr", g["lr"])
            g["lr"] = lr0 * min(cap, growth ** (step - start))

    return event


def scale_collapse_event(start: int, layer: str = "fc2", shrink: float = 1.005) -> Event:
    """From ``start`` on, ``layer``'s weights are multiplied by ``shrink`` each step (its scale leaves the others')."""

    def event(step: int, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        if step > start:
            with torch.no_grad():
                getattr(net, layer).weight.mul_(shrink)

    return event


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", choices=["anti_grokking", "healthy", "rank_collapse", "lr_spike", "scale_collapse"])
    ap.add_argument("--steps", type=int, default=300_000)
    ap.add_argument("--every", type=int, default=2_500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--start", type=int, default=400)
    ap.add_argument("--param", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.run == "anti_grokking":
        train(anti_grokking(args.steps, args.every, args.eval_every), Path(args.log_dir), quiet=False)
        return 0
    start = args.start
    events = {
        "healthy": None,
        "rank_collapse": rank_collapse_event(start, rate=args.param or 1e-5),
        "lr_spike": lr_spike_event(start, growth=args.param or 1.01),
        "scale_collapse": scale_collapse_event(start, shrink=args.param or 0.97),
    }
    train(base(args.run, args.steps, args.every), Path(args.log_dir), events[args.run], quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
