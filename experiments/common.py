"""Shared helpers of the HT-SR reproduction experiments (issue 6).

Every experiment trains with :class:`esdwatch.lightning.ESDMonitor` attached and takes
its spectral numbers from the monitor's output: ``records.jsonl`` read back with
:func:`esdwatch.rundir.read_records`, and the eigenvalues the monitor hands to its
sinks when ``keep_evals=True`` (captured by :class:`EvalsSink`, a plain esdwatch sink).
Nothing here computes a spectral metric of its own.

Contents
--------
* data: :func:`digits` (scikit-learn's 8x8 digits, flat or as 1x8x8 images, fixed split)
* models: :class:`MLP`, :class:`MiniAlexNet` (a small AlexNet-like CNN for 8x8 inputs)
* training: :class:`Task` (a LightningModule around any nn.Module), :func:`train` (Trainer +
  ESDMonitor, returns a :class:`Run` with records, eigenvalues, accuracies and timings)
* statistics: :func:`rank_corr` (Spearman / Kendall with p-values)
* output: :func:`parser` (the common CLI), :class:`Results` (the markdown file and its
  PNG figures), :func:`md_table`, :func:`fmt`, :func:`save_fig`
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import lightning.pytorch as L  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from esdwatch.engine.phases import Phase  # noqa: E402
from esdwatch.lightning import ESDMonitor  # noqa: E402
from esdwatch.rundir import read_alarms, read_records  # noqa: E402
from esdwatch.schema import (
    LayerRecord,  # noqa: E402
    summarize,  # noqa: E402
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "esdwatch-experiments"
PHASE_ORDER = {p.value: p.order for p in Phase}

# Lightning's banners and the monitor's per-run info lines drown the experiment's own output
for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "esdwatch"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*tensorboardX.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


# ----------------------------------------------------------------------------- CLI


def parser(description: str) -> argparse.ArgumentParser:
    """The options every experiment has: --quick, --smoke, --out, --log-dir, --seed, --threads."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-minutes version (smaller, shorter)")
    ap.add_argument(
        "--smoke", action="store_true", help="the smallest version, for the test suite (implies --quick; seconds)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help=f"where <name>.md and its figures go (default: {RESULTS} for the full run, "
        f"{QUICK_OUT} with --quick/--smoke, so a quick run never overwrites committed results)",
    )
    ap.add_argument(
        "--log-dir",
        default=None,
        help="keep the monitor's output (records.jsonl ...) here (default: a temporary directory)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    return ap


def mode_of(args: argparse.Namespace) -> str:
    if args.smoke:
        args.quick = True
        return "smoke"
    return "quick" if args.quick else "full"


def out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return QUICK_OUT if (args.quick or args.smoke) else RESULTS


class LogRoot:
    """The monitor's log directory root: ``--log-dir`` (kept) or a temporary one (removed at close)."""

    def __init__(self, path: str | None, name: str):
        self.keep = path is not None
        self.root = Path(path) / name if path else Path(tempfile.mkdtemp(prefix=f"esdwatch-{name}-"))
        self.root.mkdir(parents=True, exist_ok=True)

    def sub(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        if p.exists():  # a fresh run: never append to an earlier run's records
            shutil.rmtree(p)
        return p

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
        f"lightning {L.__version__}, Python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------- data


def digits(seed: int = 0, test_fraction: float = 0.25, images: bool = False, standardize: bool = False):
    """scikit-learn's 8x8 digits: (x_train, y_train, x_test, y_test) as tensors.

    Pixels scaled to [0, 1] (``standardize``: per-feature zero mean / unit variance of the
    training split instead); ``images``: shape (n, 1, 8, 8) instead of (n, 64). The split
    is stratified-free but seeded, the same for every experiment with the same seed.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234 + seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    xtr, xte = x[train], x[test]
    if standardize:
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if images:
        xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)
    return xtr, y[train], xte, y[test]


# -------------------------------------------------------------------------- models


class MLP(nn.Module):
    """in -> hidden... -> out with ReLU; layers are ``fc1``, ``fc2``, ... (last one the classifier)."""

    def __init__(self, sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        self.names = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b))
            self.names.append(f"fc{i}")
        self.act = activation()

    def forward(self, x):
        x = x.flatten(1)
        for name in self.names[:-1]:
            x = self.act(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)


class MiniAlexNet(nn.Module):
    """A small AlexNet-like CNN for 1x8x8 images (after the MiniAlexNet of Martin & Mahoney).

    conv(1->c1, 3x3) - ReLU - maxpool 2 - conv(c1->c2, 3x3) - ReLU - maxpool 2 -
    FC1 (c2*2*2 -> h1) - ReLU - FC2 (h1 -> h2) - ReLU - FC3 (h2 -> 10).
    With the defaults: conv2 is 64 x 64 per kernel position (pooled: 576 eigenvalues),
    FC1 384 x 256 (256 eigenvalues), FC2 384 x 192 (192); conv1 (1 input channel) and
    FC3 (10 outputs) are below the 50-eigenvalue size floor and are not analysed.
    """

    def __init__(self, c1: int = 64, c2: int = 64, h1: int = 384, h2: int = 192, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


# ------------------------------------------------------------------------ training


class Task(L.LightningModule):
    """A LightningModule around ``net``: cross-entropy (``loss="ce"``) or mean squared error (``"mse"``),
    SGD or Adam."""

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss: str = "ce",
        params: Callable[[nn.Module], Iterable] | None = None,
    ):
        super().__init__()
        self.net = net
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.loss_name = loss
        self.params_fn = params
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def loss(self, out, y):
        if self.loss_name == "ce":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        params = list(self.params_fn(self.net)) if self.params_fn else self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}")


class EvalsSink:
    """An esdwatch sink keeping the eigenvalues the monitor computed (``keep_evals=True``).

    ``evals[(global_step, layer)]`` is the ascending array of lambda_i = nu_i^2 that the
    monitor's worker computed for that snapshot: the exact spectrum behind the record.
    """

    def __init__(self, layers: Sequence[str] | None = None):
        self.layers = None if layers is None else set(layers)
        self.evals: dict[tuple[int, str], np.ndarray] = {}

    def write(self, records: Sequence[LayerRecord], step: int) -> None:
        for rec in records:
            if rec.report.evals is not None and (self.layers is None or rec.name in self.layers):
                self.evals[(int(rec.global_step), rec.name)] = np.asarray(rec.report.evals, dtype=np.float64)

    def alarm(self, alarm) -> None:
        return None

    def close(self) -> None:
        return None


class Capture(L.Callback):
    """Calls ``fn(step, net)`` at the start of training and after every optimizer step (for steps <= max_step)."""

    def __init__(self, fn: Callable[[int, nn.Module], None], max_step: int | None = None):
        self.fn, self.max_step = fn, max_step

    def on_train_start(self, trainer, pl_module):
        self.fn(0, pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if self.max_step is None or step <= self.max_step:
            self.fn(step, pl_module.net)


@dataclass
class Run:
    """What one monitored training run left: the monitor's records and spectra, accuracies, timings."""

    name: str
    records: list[LayerRecord]
    evals: dict[tuple[int, str], np.ndarray]
    alarms: list[Any]
    steps: int
    epochs: int
    train_s: float
    monitor_stats: dict[str, float]
    task: Task
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def snapshot_steps(self) -> list[int]:
        return sorted({r.global_step for r in self.records})

    def at(self, step: int | None = None) -> dict[str, LayerRecord]:
        """Records of one snapshot by layer name (default: the last one)."""
        steps = self.snapshot_steps
        s = steps[-1] if step is None else step
        return {r.name: r for r in self.records if r.global_step == s}

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one layer's metric over the snapshots."""
        rows = [(r.global_step, as_float(getattr(r.report, metric))) for r in self.records if r.name == layer]
        rows.sort()
        return np.array([s for s, _ in rows]), np.array([v for _, v in rows], dtype=float)

    def summary(self, step: int | None = None) -> dict[str, float]:
        """Layer averages <metric> of one snapshot (esdwatch.schema.summarize: the monitor's own summary)."""
        return summarize([r.report for r in self.at(step).values()])


def train(
    task: Task,
    train_data: tuple[torch.Tensor, torch.Tensor],
    *,
    log_dir: Path,
    batch_size: int,
    max_epochs: int | None = None,
    max_steps: int = -1,
    shuffle: bool = True,
    seed: int = 0,
    monitor: dict[str, Any] | None = None,
    keep_evals_of: Sequence[str] | None = (),
    callbacks: Sequence[L.Callback] = (),
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    name: str = "run",
) -> Run:
    """Train ``task`` on ``train_data`` with an ESDMonitor attached; return the monitor's records.

    ``monitor``: ESDMonitor options (defaults: snapshot at start and end, never skip a
    snapshot: ``on_backpressure="block"``). ``keep_evals_of``: layers whose eigenvalues
    to keep (``None``: all; empty: none). ``eval_sets``: name -> (x, y) whose accuracy
    (classification) or MSE (regression) is measured after training.
    """
    L.seed_everything(seed, workers=False, verbose=False)
    x, y = train_data
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )
    sink = EvalsSink(keep_evals_of)
    opts = dict(
        at_start=True,
        at_end=True,
        on_backpressure="block",
        max_pending=2,
        worker_nice=0,
        alarm_actions={"non_finite": "log"},
        log_summary=False,
        phase_transitions=False,
    )
    opts.update(monitor or {})
    keep = keep_evals_of is None or len(keep_evals_of) > 0
    opts.setdefault("keep_evals", keep)
    cb = ESDMonitor(log_dir=str(log_dir), sinks=[sink] if keep else [], logger_sinks=False, **opts)
    trainer = L.Trainer(
        max_epochs=max_epochs if max_epochs is not None else -1,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb, *callbacks],
        default_root_dir=str(log_dir),
    )
    t0 = time.perf_counter()
    trainer.fit(task, train_dataloaders=loader)
    elapsed = time.perf_counter() - t0
    mon = cb.monitor
    stats = dict(mon.stats) if mon is not None else {}
    path = log_dir / "esdwatch" / "records.jsonl"
    records = read_records(path)
    alarms = read_alarms(path.parent) if path.exists() else []
    run = Run(
        name=name,
        records=records,
        evals=sink.evals,
        alarms=alarms,
        steps=int(trainer.global_step),
        epochs=int(trainer.current_epoch),
        train_s=elapsed,
        monitor_stats=stats,
        task=task,
    )
    for key, (xe, ye) in (eval_sets or {}).items():
        run.metrics[key] = evaluate(task, xe, ye)
    return run


@torch.no_grad()
def evaluate(task: Task, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy for a classifier (``loss="ce"``), else the mean squared error."""
    task.eval()
    out = task(x)
    task.train()
    if task.loss_name == "ce":
        return float((out.argmax(-1) == y).float().mean())
    return float(nn.functional.mse_loss(out.squeeze(-1), y))


# ---------------------------------------------------------------------- statistics


def rank_corr(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman rho and Kendall tau (with two-sided p-values) over the finite pairs."""
    from scipy import stats

    a, b = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    out = {"n": int(ok.sum()), "rho": math.nan, "rho_p": math.nan, "tau": math.nan, "tau_p": math.nan}
    if out["n"] >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
        r = stats.spearmanr(a, b)
        t = stats.kendalltau(a, b)
        out.update(
            rho=float(r.statistic),
            rho_p=_spearman_p(a, b, float(r.statistic), float(r.pvalue)),
            tau=float(t.statistic),
            tau_p=float(t.pvalue),
        )
    return out


def _spearman_p(a: np.ndarray, b: np.ndarray, rho: float, asymptotic: float) -> float:
    """Two-sided p-value of Spearman's rho: exact (all permutations) for n <= 8, a 100k-permutation
    Monte Carlo estimate for n <= 20, scipy's t approximation above (which is 0 for |rho| = 1 at any n)."""
    import itertools

    from scipy.stats import rankdata

    n = a.size
    if n > 20:
        return asymptotic
    ra, rb = rankdata(a), rankdata(b)
    ra = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    rb = (rb - rb.mean()) / np.linalg.norm(rb - rb.mean())
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))
        stats_ = rb[perms] @ ra
        return float(np.mean(np.abs(stats_) >= abs(rho) - 1e-12))
    rng = np.random.default_rng(12345)
    perms = rng.permuted(np.tile(rb, (100_000, 1)), axis=1)
    stats_ = perms @ ra
    return float((np.sum(np.abs(stats_) >= abs(rho) - 1e-12) + 1) / (perms.shape[0] + 1))


def corr_text(c: dict[str, float], which: str = "both") -> str:
    parts = []
    if which in ("both", "spearman"):
        parts.append(f"Spearman rho = {fmt(c['rho'], 2)} (p = {fmt_p(c['rho_p'])})")
    if which in ("both", "kendall"):
        parts.append(f"Kendall tau = {fmt(c['tau'], 2)} (p = {fmt_p(c['tau_p'])})")
    return ", ".join(parts) + f", n = {c['n']}"


# -------------------------------------------------------------------------- output


def as_float(v: Any) -> float:
    """``float(v)``, or nan when v is None or not a number (for metrics that may be missing)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def fmt(v: Any, digits: int = 3) -> str:
    f = as_float(v)
    if not math.isfinite(f):
        return "-"
    return f"{f:.{digits}f}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def save_fig(fig, path: Path, dpi: int = 90, max_kb: int = 200) -> Path:
    """Save a PNG below ``max_kb`` (lowering the resolution if needed) and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for d in (dpi, 75, 60, 48):
        fig.savefig(path, dpi=d)
        if path.stat().st_size <= max_kb * 1024:
            break
    plt.close(fig)
    return path


class Results:
    """The result file ``<out>/<name>.md`` and its figures ``<out>/<name>_*.png``."""

    MONITORED = (
        "Every spectral number below was measured by `esdwatch.lightning.ESDMonitor` during training "
        "(its `records.jsonl`, and the eigenvalues it handed to its sinks with `keep_evals=True`)."
    )

    def __init__(self, name: str, args: argparse.Namespace, title: str, command: str, provenance: str | None = None):
        self.provenance = self.MONITORED if provenance is None else provenance
        self.name = name
        self.out = out_dir(args)
        self.out.mkdir(parents=True, exist_ok=True)
        self.mode = mode_of(args)
        self.title = title
        self.command = command
        self.parts: list[str] = []
        self.figures: list[Path] = []
        self.t0 = time.perf_counter()

    def fig_path(self, suffix: str) -> Path:
        return self.out / f"{self.name}_{suffix}.png"

    def figure(self, fig, suffix: str, caption: str) -> Path:
        path = save_fig(fig, self.fig_path(suffix))
        self.figures.append(path)
        self.parts.append(f"![{caption}]({path.name})\n\n*{caption}*")
        return path

    def add(self, text: str) -> None:
        self.parts.append(text.strip("\n"))

    def write(self) -> Path:
        elapsed = time.perf_counter() - self.t0
        head = [
            f"# {self.title}",
            "",
            f"`{self.command}` (mode: **{self.mode}**; {elapsed:.0f} s wall on {machine()}). " + self.provenance,
        ]
        if self.mode != "full":
            head += ["", f"**This is a {self.mode} run** (reduced sizes): its numbers are not the committed results."]
        text = "\n".join(head) + "\n\n" + "\n\n".join(self.parts) + "\n"
        path = self.out / f"{self.name}.md"
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} and {len(self.figures)} figure(s) in {elapsed:.0f} s")
        return path


def phase_counts(phases: Iterable[str]) -> str:
    from collections import Counter

    c = Counter(phases)
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: PHASE_ORDER.get(kv[0], 9)))


def setup_torch(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, int(args.threads)))
    torch.manual_seed(args.seed)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    shown = [a for a in args]
    return " ".join(["python", f"experiments/{script}", *shown])


@dataclass
class Session:
    """What every experiment's ``main`` starts with: its parsed options, mode, result file and log root."""

    args: argparse.Namespace
    mode: str
    res: Results
    logs: LogRoot


def begin(
    name: str,
    doc: str,
    title: str,
    argv: Sequence[str] | None,
    *,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    provenance: str | None = None,
    env_prefix: str = "",
) -> Session:
    """Parse the common options (and ``add_args``' own), seed torch, open the result file and log root.

    ``doc`` is the experiment's module docstring (its first paragraph becomes ``--help``); the
    command line recorded in the result file is ``experiments/<name>.py`` with ``argv``.
    """
    ap = parser(doc.split("\n\n")[0])
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    mode = mode_of(args)
    setup_torch(args)
    command = env_prefix + command_line(f"{name}.py", argv)
    res = Results(name, args, title, command, provenance=provenance)
    return Session(args, mode, res, LogRoot(args.log_dir, name))
