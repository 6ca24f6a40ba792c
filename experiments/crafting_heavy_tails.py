"""Experiment 3: heavy tails in the weight spectrum without gradient noise.

Kothapalli, Pang, Yang & Mahoney, "Crafting Heavy-Tails in Weight Matrix Spectrum without
Gradient Noise" (2024): a two-layer network trained on a teacher-student regression task by
*full-batch* gradient descent (or Adam) - no gradient noise at all - develops, within its
first few steps, a Bulk+Spikes ESD in its first-layer weights at moderate learning rates
and a heavy-tailed ESD at large ones; the top singular vectors of W align with those of
the first updates.

Here, following the paper's code (github.com/kvignesh1420/single-index-ht: its model,
parametrization, loss and readout evaluation; smaller sizes for a 2-core CPU): inputs
x ~ N(0, I_d), a single-index teacher y = softplus(<beta, x>) + 0.3 noise, a student
f(x) = a^T tanh(W x / sqrt(d)) / sqrt(h) with W (h x d) and a drawn N(0, 1), only W
trained, on the mean squared error over the *full batch* (one batch = the whole training
set, no shuffling) for a few steps, sweeping the learning rate of GD (plain SGD on the
full batch) and of Adam (learning rates in the paper's units). As in the paper, the
quality of the learned features is measured by a ridge-regression readout (lambda = 0.01)
fitted on fresh probe data and scored on test data. ``ESDMonitor(every_n_steps=1,
at_start=True, keep_evals=True)`` records W's ESD, alpha, MP soft rank and phase at every
step. The singular-vector alignment needs the update matrices themselves: a small
callback copies W after each step and the alignment |<u_1(W_t), u_1(W_1 - W_0)>| is
computed with torch (the only non-esdwatch spectral computation here).

    python experiments/crafting_heavy_tails.py            # full run (~5 min on 2 shared CPU cores)
    python experiments/crafting_heavy_tails.py --quick    # ~1-2 min
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from esdwatch.reporting.figures import draw_esd  # noqa: E402

NAME = "crafting_heavy_tails"
LAYER = "net.W"
NOISE = 0.3
RIDGE = 0.01


def settings(mode: str) -> dict:
    if mode == "smoke":
        return dict(n=400, d=96, h=160, steps=4, gd=[10.0, 1000.0, 10000.0], adam=[0.01, 1.0])
    if mode == "quick":
        return dict(
            n=1000,
            d=256,
            h=384,
            steps=8,
            gd=[10.0, 100.0, 1000.0, 3000.0, 10000.0, 30000.0],
            adam=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        )
    return dict(
        n=2000,
        d=512,
        h=768,
        steps=10,
        gd=[1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0],
        adam=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    )


class TwoLayer(nn.Module):
    """f(x) = a^T tanh(W x / sqrt(d)) / sqrt(h): W (h x d) trained, a fixed; both N(0, 1) at init."""

    def __init__(self, d: int, h: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d, self.h = d, h
        self.W = nn.Linear(d, h, bias=False)
        with torch.no_grad():
            self.W.weight.copy_(torch.randn(h, d, generator=g))
        self.register_buffer("a", torch.randn(h, generator=g))

    def features(self, x):
        return torch.tanh(self.W(x) / math.sqrt(self.d)) / math.sqrt(self.h)

    def forward(self, x):
        return self.features(x) @ self.a


def teacher_data(n: int, d: int, seed: int):
    """(train, probe, test) splits of n points each, and the teacher direction beta."""
    g = torch.Generator().manual_seed(10_000 + seed)
    beta = torch.randn(d, generator=g)
    beta /= beta.norm()
    x = torch.randn(3 * n, d, generator=g)
    y = nn.functional.softplus(x @ beta) + NOISE * torch.randn(3 * n, generator=g)
    return (x[:n], y[:n]), (x[n : 2 * n], y[n : 2 * n]), (x[2 * n :], y[2 * n :]), beta


@torch.no_grad()
def readout_mse(net: TwoLayer, probe, test) -> float:
    """The paper's feature-quality score, with an intercept: ridge readout a_hat = (Z^T Z + (lambda / h) n I)^-1
    Z^T y on the probe set's centred features Z and centred targets, mean squared error on the test set.

    (The paper's readout has no intercept; tanh features are odd, so they cannot produce the teacher's mean
    E softplus(z) ~ 0.8, and its squared mean would dominate the score whatever the features learn.)"""
    (xp, yp), (xt, yt) = probe, test
    Z = net.features(xp).double()
    zm, ym = Z.mean(0), yp.double().mean()
    Z = Z - zm
    n, h = Z.shape
    a_hat = torch.linalg.solve(Z.T @ Z + (RIDGE / h) * n * torch.eye(h, dtype=Z.dtype), Z.T @ (yp.double() - ym))
    pred = (net.features(xt).double() - zm) @ a_hat + ym
    return float(((pred - yt.double()) ** 2).mean())


def top_singular(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, 0], Vh[0]


def main(argv: Sequence[str] | None = None) -> int:
    run = C.begin(NAME, __doc__, "Experiment 3: heavy tails without gradient noise (full-batch GD and Adam)", argv)
    args, mode, res, logs = run.args, run.mode, run.res, run.logs
    cfg = settings(mode)
    results: dict[tuple[str, float], dict] = {}
    try:
        (xtr, ytr), probe, (xte, yte), beta = teacher_data(cfg["n"], cfg["d"], args.seed)
        for opt, lrs in (("gd", cfg["gd"]), ("adam", cfg["adam"])):
            for lr in lrs:
                weights: dict[int, torch.Tensor] = {}
                cap = C.Capture(
                    lambda step, net, weights=weights: weights.__setitem__(step, net.W.weight.detach().clone())
                )
                net = TwoLayer(cfg["d"], cfg["h"], seed=args.seed)
                task = C.Task(
                    net, lr=lr, optimizer="sgd" if opt == "gd" else "adam", loss="mse", params=lambda m: [m.W.weight]
                )
                init_test = C.evaluate(task, xte, yte)
                init_readout = readout_mse(net, probe, (xte, yte))
                run = C.train(
                    task,
                    (xtr, ytr),
                    log_dir=logs.sub(f"{opt}_{lr:g}"),
                    batch_size=cfg["n"],
                    max_steps=cfg["steps"],
                    shuffle=False,
                    seed=args.seed,
                    monitor=dict(every_n_steps=1),
                    keep_evals_of=[LAYER],
                    callbacks=[cap],
                    eval_sets={"train": (xtr, ytr), "test": (xte, yte)},
                    name=f"{opt} lr={lr:g}",
                )
                align = alignments(weights, beta)
                net.eval()
                run.metrics["readout"] = readout_mse(net, probe, (xte, yte))
                results[(opt, lr)] = dict(run=run, align=align, init_test=init_test, init_readout=init_readout)
                r1, rT = run.at(1)[LAYER].report, run.at()[LAYER].report
                print(
                    f"{opt:4s} lr {lr:<8g} step 1: {r1.phase:12s} alpha {C.fmt(r1.alpha, 2):>6s} | step "
                    f"{run.steps}: {rT.phase:12s} alpha {C.fmt(rT.alpha, 2):>6s} softrank {C.fmt(rT.mp_softrank, 3)} | "
                    f"align {align['u'][-1]:.3f} | test mse {init_test:.3f} -> {run.metrics['test']:.3f} | readout "
                    f"{init_readout:.3f} -> {run.metrics['readout']:.3f}",
                    flush=True,
                )
        report(res, results, cfg)
        res.write()
    finally:
        logs.close()
    return 0


def alignments(weights: dict[int, torch.Tensor], beta: torch.Tensor) -> dict[str, list[float]]:
    """|<u1(W_t), u1(G)>| and |<v1(W_t), v1(G)>| with G = W_1 - W_0 (the first update), per step t >= 1;
    also |<v1(W_t), beta>| (the teacher direction) and the same for the cumulative update W_t - W_0."""
    steps = sorted(weights)
    W0 = weights[steps[0]].double()
    G = weights[steps[1]].double() - W0
    uG, vG = top_singular(G)
    out = {"step": [], "u": [], "v": [], "v_beta": [], "cum_u": [], "update_beta": []}
    b = beta.double()
    for t in steps[1:]:
        Wt = weights[t].double()
        u, v = top_singular(Wt)
        uc, vc = top_singular(Wt - W0)
        out["step"].append(t)
        out["u"].append(float(abs(u @ uG)))
        out["v"].append(float(abs(v @ vG)))
        out["v_beta"].append(float(abs(v @ b)))
        out["cum_u"].append(float(abs(u @ uc)))
        out["update_beta"].append(float(abs(vG @ b)))
    return out


def report(res: C.Results, results: dict, cfg: dict) -> None:
    import matplotlib.pyplot as plt

    T = cfg["steps"]
    d0 = next(iter(results.values()))
    res.add(
        f"## Setup\n\nTeacher: x ~ N(0, I_{cfg['d']}), y = softplus(<beta, x>) + {NOISE} N(0, 1), |beta| = 1; "
        f"{cfg['n']} training, {cfg['n']} probe and {cfg['n']} test points. Student (the paper's parametrization): "
        f"f(x) = a^T tanh(W x / sqrt(d)) / sqrt(h), W {cfg['h']} x {cfg['d']} and a with N(0, 1) entries, only W "
        f"trained. Loss: mean squared error on the **full batch** (no gradient noise), {T} steps, the same "
        f"initialization for every run. GD = torch SGD without momentum; Adam with torch defaults; learning rates "
        f"in the paper's units (its code sweeps 0.001 to 3000 at d = 1000, h = 1500; d is halved here, which "
        f"roughly doubles the effect of a GD rate). `ESDMonitor(every_n_steps=1, at_start=True, keep_evals=True)` "
        f"on W ({cfg['d']} eigenvalues per snapshot). Feature quality as in the paper: ridge readout (lambda = "
        f"{RIDGE}, plus an intercept, which the paper's readout lacks) fitted on the probe set's hidden features, MSE "
        f"on the test set; at initialization (random features) it is {C.fmt(d0['init_readout'])} (the label noise "
        f"alone gives {NOISE**2:.2f}), and the test MSE of the raw student output is {C.fmt(d0['init_test'])}."
    )

    rows = []
    for (opt, lr), d in results.items():
        run, al = d["run"], d["align"]
        r1, rT = run.at(1)[LAYER].report, run.at()[LAYER].report
        rows.append(
            [
                opt.upper() if opt == "gd" else "Adam",
                f"{lr:g}",
                r1.phase,
                C.fmt(r1.alpha, 2),
                f"**{rT.phase}**",
                C.fmt(rT.alpha, 2),
                C.fmt(rT.mp_softrank, 3),
                rT.num_spikes,
                C.fmt(rT.stable_rank, 1),
                rT.num_traps,
                C.fmt(al["u"][-1], 2),
                C.fmt(al["v"][-1], 2),
                C.fmt(al["cum_u"][-1], 2),
                C.fmt(al["v_beta"][-1], 2),
                C.fmt(al["update_beta"][-1], 2),
                C.fmt(run.metrics["readout"]),
                C.fmt(run.metrics["train"]),
                C.fmt(run.metrics["test"]),
            ]
        )
    res.add(
        f"## W after step 1 and after step {T}, per optimizer and learning rate\n\n"
        "`u1.G` / `v1.G`: |<u_1(W), u_1(G)>| and |<v_1(W), v_1(G)>|, overlaps of the top left / right singular "
        f"vectors of W after step {T} with those of the first update G = W_1 - W_0; `u1.(W-W0)`: the same with "
        f"the accumulated update W_{T} - W_0; `v1.beta`: overlap of W's top right singular vector with the "
        "teacher direction, `vG.beta` that of the first update's. `readout`: the paper's feature-quality score "
        "(test MSE of the ridge readout, lower is better); `train` / `test`: MSE of the student's own output "
        "(fixed a). At initialization W is "
        f"{d0['run'].at(0)[LAYER].report.phase} (alpha {C.fmt(d0['run'].at(0)[LAYER].report.alpha, 2)}).\n\n"
        + C.md_table(
            [
                "opt",
                "lr",
                "phase @1",
                "alpha @1",
                f"phase @{T}",
                f"alpha @{T}",
                "MP soft rank",
                "spikes",
                "stable rank",
                "traps",
                "u1.G",
                "v1.G",
                "u1.(W-W0)",
                "v1.beta",
                "vG.beta",
                "readout",
                "train",
                "test",
            ],
            rows,
        )
    )

    # ---- trend with the learning rate
    crow, corr = [], {}
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        if len(lrs) < 3:
            continue
        for step_label, getter in (("1", lambda run: run.at(1)), (str(T), lambda run: run.at())):
            recs = [getter(results[(opt, lr)]["run"])[LAYER].report for lr in lrs]
            ph = [C.PHASE_ORDER.get(r.phase, math.nan) for r in recs]
            al = [C.as_float(r.alpha) for r in recs]
            sr = [C.as_float(r.mp_softrank) for r in recs]
            cp, ca, cs = C.rank_corr(np.log(lrs), ph), C.rank_corr(np.log(lrs), al), C.rank_corr(np.log(lrs), sr)
            corr[(opt, step_label)] = (cp, ca, cs)
            crow.append(
                [
                    opt.upper() if opt == "gd" else "Adam",
                    step_label,
                    f"{C.fmt(cp['rho'], 2)} (p {C.fmt_p(cp['rho_p'])})",
                    f"{C.fmt(ca['rho'], 2)} (p {C.fmt_p(ca['rho_p'])})",
                    f"{C.fmt(cs['rho'], 2)} (p {C.fmt_p(cs['rho_p'])})",
                ]
            )
    res.add(
        "## Trend with the learning rate\n\nSpearman rho between log(learning rate) and the phase order "
        "(0 Random-like, 1 Bleeding-out, 2 Bulk+Spikes, 3 Bulk-decay, 4 Heavy-Tailed), alpha and the MP soft "
        "rank (claim: phase up, alpha and soft rank down as the rate grows).\n\n"
        + C.md_table(["optimizer", "step", "rho(phase)", "rho(alpha)", "rho(soft rank)"], crow)
    )

    # ---- figure: alpha / soft rank vs lr
    colors = {
        p.value: c
        for p, c in zip(C.Phase, ("#999999", "#9ecae1", "#2ca02c", "#ff7f0e", "#d62728", "#6a3d9a", "#000000"))
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, metric in zip(axes, ("alpha", "mp_softrank")):
        for opt, marker in (("gd", "o"), ("adam", "s")):
            lrs = [lr for (o, lr) in results if o == opt]
            for step, ls in ((1, ":"), (T, "-")):
                recs = [
                    (results[(opt, lr)]["run"].at(step) if step == 1 else results[(opt, lr)]["run"].at())[LAYER].report
                    for lr in lrs
                ]
                vals = [C.as_float(getattr(r, metric)) for r in recs]
                ax.plot(
                    lrs,
                    vals,
                    ls,
                    color="#555555" if opt == "gd" else "#1f77b4",
                    lw=1,
                    label=f"{'GD' if opt == 'gd' else 'Adam'}, step {step}",
                )
                ax.scatter(
                    lrs,
                    vals,
                    c=[colors.get(r.phase, "#000") for r in recs],
                    marker=marker,
                    s=30,
                    zorder=3,
                    edgecolors="k",
                    linewidths=0.4,
                )
        ax.set_xscale("log")
        ax.set_yscale("log" if metric == "mp_softrank" else "linear")
        ax.set_xlabel("learning rate")
        ax.set_title(f"W: {metric} (marker colour = phase)", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=p)
        for p, c in colors.items()
        if any(
            d["run"].at()[LAYER].report.phase == p or d["run"].at(1)[LAYER].report.phase == p for d in results.values()
        )
    ]
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    res.figure(
        fig,
        "alpha_vs_lr",
        f"alpha and MP soft rank of W versus the learning rate, after step 1 (dotted) and "
        f"step {T} (solid); circles GD, squares Adam; colour = esdwatch phase",
    )

    # ---- figure: ESD grid
    picks = {}
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        idx = sorted(set(np.linspace(0, len(lrs) - 1, min(4, len(lrs))).round().astype(int)))
        picks[opt] = [lrs[i] for i in idx]
    cols = max(len(v) for v in picks.values())
    fig, axes = plt.subplots(2, cols, figsize=(3.3 * cols, 5.6), squeeze=False)
    for row, opt in enumerate(("gd", "adam")):
        for col in range(cols):
            ax = axes[row, col]
            if col >= len(picks[opt]):
                ax.axis("off")
                continue
            lr = picks[opt][col]
            run = results[(opt, lr)]["run"]
            rec = run.at()[LAYER]
            r = rec.report
            draw_esd(
                ax,
                rec,
                run.evals.get((run.snapshot_steps[-1], LAYER)),
                legend=False,
                title=f"{'GD' if opt == 'gd' else 'Adam'} lr {lr:g}, step {T}\n{r.phase}, alpha {C.fmt(r.alpha, 2)}",
            )
            ax.title.set_fontsize(8)
            ax.set_xlabel("")
            ax.set_ylabel("")
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    res.figure(
        fig,
        "esd",
        f"ESD of W after {T} full-batch steps, increasing learning rate left to right "
        "(top GD, bottom Adam), with the monitor's MP and power-law fits",
    )

    # ---- figure: alignment over steps
    fig, axes = plt.subplots(2, 2, figsize=(11, 5.6))
    for col, opt in enumerate(("gd", "adam")):
        lrs = [lr for (o, lr) in results if o == opt]
        cmap = plt.get_cmap("plasma")
        for row, (key, label) in enumerate(
            (("v", "|<v1(W_t), v1(G)>| (input side)"), ("u", "|<u1(W_t), u1(G)>| (hidden side)"))
        ):
            ax = axes[row, col]
            for i, lr in enumerate(lrs):
                al = results[(opt, lr)]["align"]
                ax.plot(al["step"], al[key], "-o", ms=3, color=cmap(i / max(1, len(lrs) - 1)), label=f"lr {lr:g}")
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("step t")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title("GD" if opt == "gd" else "Adam", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    res.figure(
        fig,
        "alignment",
        "Overlap of W's top right (top row) and left (bottom row) singular vectors with those "
        "of the first update G = W_1 - W_0, per step",
    )

    # ---- verdict
    lines = []
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        seq = [(lr, results[(opt, lr)]["run"].at()[LAYER].report.phase) for lr in lrs]
        bs = [lr for lr, p in seq if p == "Bulk+Spikes"]
        ht = [lr for lr, p in seq if p == "Heavy-Tailed"]
        name = "GD" if opt == "gd" else "Adam"
        text = f"- **{name}** after {T} steps: " + ", ".join(f"lr {lr:g} {p}" for lr, p in seq) + ". "
        if bs and ht and min(ht) > min(bs):
            text += (
                f"Bulk+Spikes first appears at lr {min(bs):g}, Heavy-Tailed at lr {min(ht):g}: the claimed order "
                "(spikes at moderate, heavy tails at large rates) holds. "
            )
        elif ht:
            text += f"Heavy-Tailed at lr >= {min(ht):g}; " + (
                f"no Bulk+Spikes stage at step {T} in this grid. " if not bs else ""
            )
        else:
            text += "No Heavy-Tailed ESD in this grid. "
        key = (opt, str(T))
        if key in corr:
            cp, ca, cs = corr[key]
            text += (
                f"Phase vs log lr: Spearman rho {C.fmt(cp['rho'], 2)} (p {C.fmt_p(cp['rho_p'])}); alpha vs log lr: "
                f"rho {C.fmt(ca['rho'], 2)} (p {C.fmt_p(ca['rho_p'])})."
            )
        seq1 = [(lr, results[(opt, lr)]["run"].at(1)[LAYER].report.phase) for lr in lrs]
        text += " After the first step alone: " + ", ".join(f"lr {lr:g} {p}" for lr, p in seq1) + "."
        lines.append(text)
    al_lines = []
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        spiky = [
            lr
            for lr in lrs
            if results[(opt, lr)]["run"].at()[LAYER].report.phase not in ("Random-like", "Bleeding-out")
        ]
        if spiky:
            vals = [results[(opt, lr)]["align"]["u"][-1] for lr in spiky]
            vb = [results[(opt, lr)]["align"]["v_beta"][-1] for lr in spiky]
            vc = [results[(opt, lr)]["align"]["cum_u"][-1] for lr in spiky]
            vv = [results[(opt, lr)]["align"]["v"][-1] for lr in spiky]
            al_lines.append(
                f"{'GD' if opt == 'gd' else 'Adam'}: over the {len(spiky)} rates whose W left the "
                f"random-like phases (lr {', '.join(f'{lr:g}' for lr in spiky)}), the top *right* "
                f"(input-space) singular vector of W_{T} overlaps that of the first update by "
                f"{min(vv):.2f}-{max(vv):.2f} (median {np.median(vv):.2f}), the top *left* (hidden-unit) "
                f"one by {min(vals):.2f}-{max(vals):.2f} (median {np.median(vals):.2f}); with the "
                f"accumulated update W_{T} - W_0 the left overlap is {min(vc):.2f}-{max(vc):.2f} (median "
                f"{np.median(vc):.2f}); W's top right singular vector overlaps the teacher direction by "
                f"{min(vb):.2f}-{max(vb):.2f}"
            )
    gen_lines = []
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        ro = [results[(opt, lr)]["run"].metrics["readout"] for lr in lrs]
        best = int(np.nanargmin(ro))
        r_best = results[(opt, lrs[best])]["run"].at()[LAYER].report
        c = C.rank_corr([C.as_float(results[(opt, lr)]["run"].at()[LAYER].report.alpha) for lr in lrs], ro)
        gen_lines.append(
            f"{'GD' if opt == 'gd' else 'Adam'}: best readout MSE {ro[best]:.3f} (initial features "
            f"{results[(opt, lrs[0])]['init_readout']:.3f}) at lr {lrs[best]:g}, where W is "
            f"{r_best.phase} (alpha {C.fmt(r_best.alpha, 2)}); alpha vs readout MSE over the rates: "
            f"{C.corr_text(c, 'spearman')}"
        )
    heads = []
    for opt in ("gd", "adam"):
        lrs = [lr for (o, lr) in results if o == opt]
        found = []
        for step in (1, T):
            seq = [
                (results[(opt, lr)]["run"].at(step) if step == 1 else results[(opt, lr)]["run"].at())[
                    LAYER
                ].report.phase
                for lr in lrs
            ]
            bsp = [i for i, p in enumerate(seq) if p == "Bulk+Spikes"]
            ht = [i for i, p in enumerate(seq) if p == "Heavy-Tailed"]
            if bsp and ht and min(ht) > max(bsp):
                found.append(
                    f"after step {step}: Bulk+Spikes at lr {', '.join(f'{lrs[i]:g}' for i in bsp)}, "
                    f"Heavy-Tailed at lr {', '.join(f'{lrs[i]:g}' for i in ht)}"
                )
            elif ht:
                found.append(
                    f"after step {step}: Heavy-Tailed at lr {', '.join(f'{lrs[i]:g}' for i in ht)} "
                    f"{'without a Bulk+Spikes stage below' if not bsp else 'but not above every Bulk+Spikes rate'}"
                )
            else:
                found.append(
                    f"after step {step}: no Heavy-Tailed ESD"
                    + (f" (Bulk+Spikes at lr {', '.join(f'{lrs[i]:g}' for i in bsp)})" if bsp else "")
                )
        ok = [f for f in found if "Bulk+Spikes at lr" in f and "Heavy-Tailed at lr" in f]
        name = "GD" if opt == "gd" else "Adam"
        verdict = (
            "reproduced"
            if len(ok) == 2
            else "reproduced after the first step"
            if found and found[0] in ok
            else f"reproduced after step {T}"
            if ok
            else "not reproduced"
        )
        heads.append(f"**{name}: {verdict}** ({'; '.join(found)}).")
    res.add(
        "## Verdict\n\nClaim: Bulk+Spikes at moderate learning rates, Heavy-Tailed at large ones, without "
        "gradient noise.\n\n"
        + "\n".join(f"- {h}" for h in heads)
        + "\n\nDetails:\n\n"
        + "\n".join(lines)
        + "\n\n**Alignment:** "
        + "; ".join(al_lines)
        + ". (For a random-like W the top singular vectors are unrelated to G: overlaps of order "
        f"1/sqrt({cfg['h']}) = {1 / math.sqrt(cfg['h']):.2f}.)\n\n**Features and generalization:** "
        + "; ".join(gen_lines)
        + ".\n\n"
        "No gradient noise is involved (full batch, fixed order): whatever structure the ESD shows comes "
        "from the size of the steps. Caveats: esdwatch's phase rules call a W dominated by one huge "
        "spike plus a broad cloud of outliers (stable rank near 1, lambda_max >> lambda_+) Heavy-Tailed when "
        "more than 5% of the eigenvalues and 40% of the energy lie above the MP edge; the ESD figure shows "
        "the spectra so that the distinction between 'a few spikes' and 'a power-law tail' can be judged by eye. "
        "The student's own output (a fixed) gets worse at the largest rates (train/test columns): the readout "
        "score, not the raw output, is what the paper relates to the ESD."
    )


if __name__ == "__main__":
    sys.exit(main())
