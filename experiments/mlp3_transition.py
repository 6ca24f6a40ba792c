"""Experiment 1: the entropy and stable-rank transition of a 3-layer MLP trained from scratch.

Martin & Mahoney (JMLR 2021, section 6, "MLP3"): as a small fully connected network trains
away from its random initialization, the matrix entropy and the stable rank of its hidden
layers FC1 and FC2 decrease, and the ESD leaves the Marchenko-Pastur shape (scree plots
at initialization and at the end of training).

Here: an MLP 64 -> 512 -> 512 -> 10 (FC1 is 512 x 64, 64 eigenvalues; FC2 512 x 512;
FC3, 10 outputs, is below the 50-eigenvalue floor) trained with SGD + momentum on
scikit-learn's 8x8 digits, with ``ESDMonitor(every_n_steps=...)`` snapshotting FC1 and
FC2 during training. Everything spectral comes from the monitor: the entropy, stable
rank, alpha, MP soft rank and phase per snapshot from its ``records.jsonl``, the
eigenvalues of the scree plots and ESDs from the spectra it hands to its sinks
(``keep_evals=True``).

    python experiments/mlp3_transition.py            # full run (~5 min on 2 shared CPU cores)
    python experiments/mlp3_transition.py --quick    # ~1 min
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from esdwatch.reporting.figures import draw_esd  # noqa: E402

NAME = "mlp3_transition"
LAYERS = ("fc1", "fc2")
METRICS = ("entropy", "stable_rank", "alpha", "mp_softrank")


def settings(mode: str) -> dict:
    if mode == "smoke":
        return dict(hidden=128, epochs=3, batch=32, lr=0.05, snaps_per_epoch=1)
    if mode == "quick":
        return dict(hidden=512, epochs=15, batch=32, lr=0.05, snaps_per_epoch=2)
    return dict(hidden=512, epochs=60, batch=32, lr=0.05, snaps_per_epoch=2)


def main(argv: Sequence[str] | None = None) -> int:
    run = C.begin(NAME, __doc__, "Experiment 1: entropy and stable-rank transition of a 3-layer MLP", argv)
    args, mode, res, logs = run.args, run.mode, run.res, run.logs
    cfg = settings(mode)
    try:
        xtr, ytr, xte, yte = C.digits(seed=args.seed)
        h = cfg["hidden"]
        torch.manual_seed(args.seed)
        net = C.MLP([64, h, h, 10])
        steps_per_epoch = int(np.ceil(len(xtr) / cfg["batch"]))
        every = max(1, steps_per_epoch // cfg["snaps_per_epoch"])
        task = C.Task(net, lr=cfg["lr"], momentum=0.9)
        run = C.train(
            task,
            (xtr, ytr),
            log_dir=logs.sub("run"),
            batch_size=cfg["batch"],
            max_epochs=cfg["epochs"],
            seed=args.seed,
            monitor=dict(every_n_steps=every),
            keep_evals_of=[f"net.{n}" for n in LAYERS],
            eval_sets={"train": (xtr, ytr), "test": (xte, yte)},
            name=NAME,
        )
        print(
            f"trained {run.steps} steps in {run.train_s:.1f} s: train acc {run.metrics['train']:.3f}, "
            f"test acc {run.metrics['test']:.3f}; {len(run.snapshot_steps)} snapshots"
        )
        report(res, run, cfg, every, h)
        res.write()
    finally:
        logs.close()
    return 0


def report(res: C.Results, run: C.Run, cfg: dict, every: int, h: int) -> None:
    import matplotlib.pyplot as plt

    steps = run.snapshot_steps
    first, last = steps[0], steps[-1]
    names = [f"net.{n}" for n in LAYERS]
    res.add(
        f"## Setup\n\nMLP 64 -> {h} -> {h} -> 10 (ReLU), SGD lr {cfg['lr']}, momentum 0.9, batch {cfg['batch']}, "
        f"{cfg['epochs']} epochs ({run.steps} steps) on scikit-learn's digits (64 features, "
        f"1348 train / 449 test images). `ESDMonitor(every_n_steps={every}, at_start=True, "
        f"keep_evals=True)`: {len(steps)} snapshots from step {first} to {last}. Final accuracy: train "
        f"{run.metrics['train']:.3f}, test {run.metrics['test']:.3f}. Monitor: "
        f"{int(run.monitor_stats.get('analysed', 0))} snapshots analysed, "
        f"{int(run.monitor_stats.get('skipped', 0))} skipped, analysis "
        f"{run.monitor_stats.get('analysis_wall_s', 0):.1f} s wall in the background worker; training took "
        f"{run.train_s:.1f} s."
    )

    # ---- numbers: init vs end, monotonic trend
    rows, verdicts = [], []
    for name in names:
        for metric in METRICS:
            s, v = run.series(name, metric)
            c = C.rank_corr(s, v)
            v0, v1 = v[0], v[-1]
            vmin_step = s[int(np.nanargmin(v))] if np.isfinite(v).any() else None
            rows.append(
                [
                    name,
                    metric,
                    C.fmt(v0, 3),
                    C.fmt(v1, 3),
                    C.fmt(100 * (v1 - v0) / abs(v0), 1) + " %",
                    C.fmt(c["rho"], 2),
                    C.fmt_p(c["rho_p"]),
                    C.fmt(c["tau"], 2),
                    vmin_step,
                ]
            )
            if metric in ("entropy", "stable_rank"):
                verdicts.append((name, metric, v0, v1, c))
    res.add(
        "## Metrics at initialization and at the end, and their trend over the snapshots\n\n"
        "Spearman rho / Kendall tau of the metric against the training step over all snapshots "
        "(negative: decreases as training proceeds).\n\n"
        + C.md_table(
            ["layer", "metric", "init", "end", "change", "Spearman rho", "p", "Kendall tau", "step of minimum"], rows
        )
    )

    # ---- phases over time
    prow = []
    for name in names:
        seq = [(r.global_step, r.report.phase) for r in run.records if r.name == name]
        seq.sort()
        changes = [seq[0]] + [b for a, b in zip(seq, seq[1:]) if a[1] != b[1]]
        prow.append([name, " -> ".join(f"{p} (step {s})" for s, p in changes), C.phase_counts(p for _, p in seq)])
    res.add(
        "## Phase per snapshot (esdwatch's classifier)\n\n"
        + C.md_table(["layer", "phase sequence (first step of each)", "snapshots per phase"], prow)
    )

    # ---- figures: metric trajectories
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0))
    for ax, metric in zip(axes, METRICS):
        for name, color in zip(names, ("#1f77b4", "#d62728")):
            s, v = run.series(name, metric)
            ax.plot(np.maximum(s, 0.5), v, "-o", ms=2.5, color=color, label=name.replace("net.", "").upper())
        ax.set_xscale("log")
        ax.set_xlabel("step (log; step 0 drawn at 0.5)")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    res.figure(fig, "trajectories", "Matrix entropy, stable rank, alpha and MP soft rank of FC1 and FC2 per snapshot")

    # ---- scree plots at init and end
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, name in zip(axes, names):
        for step, style, label in ((first, "--", f"init (step {first})"), (last, "-", f"end (step {last})")):
            ev = run.evals.get((step, name))
            if ev is None:
                continue
            sv = np.sqrt(np.clip(ev[::-1], 0, None))
            ax.plot(np.arange(1, sv.size + 1), sv, style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("index i (descending, log)")
        ax.set_ylabel("singular value nu_i")
        ax.set_title(f"{name.replace('net.', '').upper()} scree plot", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    res.figure(
        fig, "scree", "Scree plots (singular values, descending) of FC1 and FC2 at initialization and at the end"
    )

    # ---- ESDs at init and end
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.2))
    recs = {(r.global_step, r.name): r for r in run.records}
    for row, name in enumerate(names):
        for col, step in enumerate((first, last)):
            rec = recs[(step, name)]
            draw_esd(axes[row, col], rec, run.evals.get((step, name)), legend=(col == 1))
    fig.tight_layout()
    res.figure(
        fig,
        "esd",
        "ESD of FC1 and FC2 at initialization (left) and at the end (right), with the monitor's "
        "MP fit of the bulk and power-law fit of the tail",
    )

    # ---- verdict
    lines = []
    dec_all, sig_all = True, True
    for name, metric, v0, v1, c in verdicts:
        dec = v1 < v0 and c["rho"] < 0
        dec_all &= dec
        sig_all &= dec and c["rho_p"] < 0.05
        lines.append(
            f"- {name.replace('net.', '').upper()} {metric}: {C.fmt(v0, 3)} at init -> {C.fmt(v1, 3)} at the "
            f"end ({'decreased' if v1 < v0 else 'did NOT decrease'}); trend over snapshots {C.corr_text(c)}."
        )
    if sig_all:
        head = (
            "**Reproduced.** Both the matrix entropy and the stable rank of FC1 and FC2 decrease as training "
            "proceeds away from the random initialization"
        )
    elif dec_all:
        head = (
            "**Direction reproduced, not significant:** every metric decreases, but there are too few snapshots "
            "for the trend to be significant"
        )
    else:
        head = "**Not (fully) reproduced.** Not every metric decreases over training"
    alpha_note = []
    for name in names:
        s, a = run.series(name, "alpha")
        _, sr = run.series(name, "mp_softrank")
        alpha_note.append(
            f"{name.replace('net.', '').upper()}: alpha {C.fmt(a[0], 2)} -> {C.fmt(a[-1], 2)}, "
            f"MP soft rank {C.fmt(sr[0], 2)} -> {C.fmt(sr[-1], 2)}, phase "
            f"{run.at(first)[name].report.phase} -> {run.at(last)[name].report.phase}"
        )
    rel = {(n, m): 100 * (v1 - v0) / abs(v0) for n, m, v0, v1, _ in verdicts}
    size = (
        "Sizes of the decrease: entropy "
        + ", ".join(f"{n.replace('net.', '').upper()} {rel[(n, 'entropy')]:+.0f}%" for n in names)
        + " (the entropy of a wide random matrix is already close to 1 and moves little when a few directions "
        "grow); stable rank "
        + ", ".join(f"{n.replace('net.', '').upper()} {rel[(n, 'stable_rank')]:+.0f}%" for n in names)
        + "."
    )
    res.add(
        "## Verdict\n\n"
        + head
        + ":\n\n"
        + "\n".join(lines)
        + "\n\n"
        + size
        + "\n\n"
        + "Alongside: "
        + "; ".join(alpha_note)
        + ". "
        "The scree plots show the mechanism: training pulls a few large singular values out of the flat "
        "random spectrum (the head of the scree curve rises) while the tail barely moves, so the spectral "
        "energy concentrates (lower entropy) and ||W||_2 grows faster than ||W||_F (lower stable rank). "
        "Caveats: digits is a small, easy task (the network fits the training set early), FC1 has only 64 "
        "eigenvalues (64 input pixels), so its tail fit rests on few points; the decrease is of the same "
        "nature as in the paper's MLP3 but its size depends on the learning rate and the training length "
        "chosen here."
    )


if __name__ == "__main__":
    sys.exit(main())
