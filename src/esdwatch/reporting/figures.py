"""Matplotlib figures of esdwatch records: ESDs, the phase map, metric trajectories.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly,
never through ``pyplot``: no global state, no GUI backend, safe from any thread, and
the user's own ``matplotlib.use(...)`` choice is left alone. Needs the ``plot`` extra
(``pip install 'esdwatch[plot]'``); importing this module does not import matplotlib.

* :func:`esd_figure`: one layer's ESD on log-log axes (density of the eigenvalues on
  log-spaced bins), the fitted Marchenko-Pastur density of the bulk, the power-law fit
  over ``[x_min, lambda_max]``, titled with the layer's phase and alpha.
* :func:`phase_map_figure`: layers (rows, model order) by snapshots (columns), each cell
  colored by the layer's phase at that snapshot, with a legend.
* :func:`trajectory_figure`: one metric per layer over global steps;
* :func:`layer_order`: the rows and lines of these figures, and the report's layer order.
* :func:`figure_to_rgb` / :func:`save_png`: render to an RGB array / a PNG file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from esdwatch.schema import (
    PHASES,
    UNKNOWN_PHASE,
    LayerRecord,
    LayerReport,
    Log10Histogram,
    log10_histogram,
    phase_name,
    phase_ordinal,
)

__all__ = [
    "PHASE_COLORS",
    "ABSENT_COLOR",
    "draw_esd",
    "esd_figure",
    "esd_pair_figure",
    "mp_bulk",
    "phase_grid",
    "layer_order",
    "phase_map_figure",
    "trajectory_figure",
    "figure_to_rgb",
    "save_png",
    "require_matplotlib",
]

#: Cell colors of the phase map, by phase (ordered: cool = random-like, warm = heavy-tailed).
PHASE_COLORS: dict[str, str] = {
    "Random-like": "#9ecae1",
    "Bleeding-out": "#4292c6",
    "Bulk+Spikes": "#41ab5d",
    "Bulk-decay": "#fdae61",
    "Heavy-Tailed": "#d7301f",
    "Rank-collapse": "#3f007d",
    UNKNOWN_PHASE: "#d9d9d9",
}
#: A layer not analysed at a snapshot.
ABSENT_COLOR = "#ffffff"

PLOT_EXTRA_HINT = "pip install 'esdwatch[plot]'"


def require_matplotlib():
    """Import matplotlib (ImportError naming the ``plot`` extra when it is missing)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"esdwatch figures need matplotlib: {PLOT_EXTRA_HINT}") from exc
    return matplotlib


def _figure(width: float, height: float, dpi: int = 100):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """The rendered figure as an H x W x 3 uint8 array."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_png(fig, path) -> None:
    """Write the figure to ``path`` as PNG."""
    fig.savefig(str(path), format="png", dpi=fig.dpi)


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def _fmt(value: Any, spec: str = ".2f") -> str:
    v = _num(value)
    return format(v, spec) if math.isfinite(v) else "n/a"


# ------------------------------------------------------------------------ ESD

_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _pow10_label(value: float, _pos: Any = None) -> str:
    """``10³``-style tick labels in plain Unicode (mathtext labels are slow to lay out)."""
    if not value > 0:
        return ""
    e = math.log10(value)
    if abs(e - round(e)) > 1e-6:
        return ""
    return "10" + str(int(round(e))).translate(_SUPERSCRIPT)


def _log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10.0, numticks=7))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(_pow10_label))


def mp_bulk(report: LayerReport) -> tuple[float, float, float, float] | None:
    """The fitted MP law of a layer's bulk: ``(sigma2, N_b, Q_b, mass)`` or None.

    The MP fit may deflate spikes: its bulk is MP(sigma^2) of an N_b x M_b matrix, with
    ``lambda_+- = sigma^2 (sqrt(N_b) +- sqrt(M_b))^2`` (unnormalized). N_b and M_b are
    recovered from the report's ``lambda_plus``, ``lambda_minus`` and ``mp_sigma2``
    (N and M when ``lambda_minus`` is missing). The bulk's density in unnormalized
    eigenvalues is ``mass * mp_pdf(lambda / N_b, sigma^2, Q_b) / N_b`` with ``mass = M_b / M``,
    its share of the ESD.
    """
    sigma2, lam_plus, lam_minus = _num(report.mp_sigma2), _num(report.lambda_plus), _num(report.lambda_minus)
    N, M = int(report.N or 0), int(report.M or 0)
    if not (math.isfinite(sigma2) and sigma2 > 0 and N > 0 and M > 0):
        return None
    if math.isfinite(lam_plus) and lam_plus > 0 and math.isfinite(lam_minus) and lam_minus >= 0:
        a, b = math.sqrt(lam_plus / sigma2), math.sqrt(lam_minus / sigma2)
        sn, sm = 0.5 * (a + b), 0.5 * (a - b)
        if sm > 0:
            n_b, m_b = sn * sn, sm * sm
            return sigma2, n_b, max(n_b / m_b, 1.0), min(1.0, m_b / M)
    Q = N / M if N >= M else M / N
    return sigma2, float(max(N, M)), Q, 1.0


def draw_esd(
    ax,
    report: LayerReport | LayerRecord,
    evals: Any = None,
    *,
    hist: Log10Histogram | None = None,
    bins: int = 60,
    step: int | None = None,
    title: str | None = None,
    legend: bool = True,
) -> None:
    """Draw one layer's ESD with its fits on ``ax`` (see :func:`esd_figure`)."""
    if isinstance(report, LayerRecord):
        step = report.global_step if step is None else step
        report = report.report
    ev = evals if evals is not None else report.evals
    if hist is None and ev is not None:
        hist = log10_histogram(ev, bins=bins)
    n_total = hist.num if hist is not None else max(int(report.num_evals or 0), 0)
    xs_lo, xs_hi = math.inf, 0.0
    if hist is not None and hist.num > 0:
        edges = 10.0**hist.edges
        widths = np.diff(edges)
        dens = hist.counts / (hist.num * widths)
        ax.stairs(
            np.where(dens > 0, dens, np.nan),
            edges,
            fill=True,
            color="#6baed6",
            alpha=0.75,
            label=f"ESD ({hist.num} eigenvalues)",
        )
        xs_lo, xs_hi = float(edges[0]), float(edges[-1])
        if hist.num_floor:
            ax.annotate(
                f"{hist.num_floor} \u2248 0",
                (edges[0], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(9, -12),
                textcoords="offset points",
                fontsize=7,
                color="#3f007d",
            )
    elif ev is None:
        ax.text(
            0.5,
            0.55,
            "no spectrum recorded\n(keep_evals=True)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="#888888",
        )

    lam_max = _num(report.lambda_max)
    if not math.isfinite(xs_hi) or xs_hi <= 0:
        xs_hi = lam_max if math.isfinite(lam_max) and lam_max > 0 else 1.0
    bulk = mp_bulk(report)
    if bulk is not None:
        from esdwatch.engine.mp import mp_edges, mp_pdf

        sigma2, n_b, q_b, mass = bulk
        a, b = mp_edges(sigma2, q_b)
        lo = max(a, b * 1e-4) if a > 0 else b * 1e-4
        x = np.geomspace(lo, b, 400)
        ax.plot(n_b * x, mass * mp_pdf(x, sigma2, q_b) / n_b, color="#08519c", lw=1.6, label="MP fit of the bulk")
        lam_plus = _num(report.lambda_plus)
        if math.isfinite(lam_plus):
            ax.axvline(lam_plus, color="#08519c", ls=":", lw=1.0, label="\u03bb+ (MP edge)")
        xs_lo = min(xs_lo, n_b * lo)
        xs_hi = max(xs_hi, n_b * b)
    alpha, xmin = _num(report.alpha), _num(report.xmin)
    if math.isfinite(alpha) and alpha > 1 and math.isfinite(xmin) and xmin > 0:
        top = lam_max if math.isfinite(lam_max) and lam_max > xmin else xmin * 10
        n_tail = int(report.n_tail) if report.n_tail is not None and report.n_tail > 0 else 0
        frac = n_tail / n_total if n_total > 0 and n_tail > 0 else 1.0
        x = np.geomspace(xmin, top, 100)
        y = frac * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)
        sigma = _num(report.alpha_sigma)
        label = f"power law, \u03b1 = {alpha:.2f}" + (f" \u00b1 {sigma:.2f}" if math.isfinite(sigma) else "")
        ax.plot(x, y, color="#d7301f", lw=1.8, ls="--", label=label)
        if math.isfinite(sigma) and alpha - sigma > 1:  # the fit's alpha -/+ its standard error
            y_lo, y_hi = (frac * (a - 1.0) / xmin * (x / xmin) ** (-a) for a in (alpha - sigma, alpha + sigma))
            ax.fill_between(x, np.minimum(y_lo, y_hi), np.maximum(y_lo, y_hi), color="#d7301f", alpha=0.15, lw=0)
        ax.axvline(xmin, color="#d7301f", ls=":", lw=1.0, label="x_min")
        xs_lo, xs_hi = min(xs_lo, xmin), max(xs_hi, top)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax)
    if math.isfinite(xs_lo) and xs_hi > xs_lo > 0:
        ax.set_xlim(xs_lo / 1.5, xs_hi * 1.5)
    ax.set_xlabel("eigenvalue \u03bb of W\u1d40W")
    ax.set_ylabel("density")
    if title is None:
        where = f" @ step {step}" if step is not None else ""
        title = f"{report.name}{where}\n{phase_name(report.phase)}, \u03b1 = {_fmt(alpha)}"
    ax.set_title(title, fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    if legend and handles:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="major", alpha=0.25)


def esd_figure(
    report: LayerReport | LayerRecord,
    evals: Any = None,
    *,
    hist: Log10Histogram | None = None,
    bins: int = 60,
    step: int | None = None,
    title: str | None = None,
    size: tuple[float, float] = (5.0, 3.6),
    dpi: int = 100,
):
    """One layer's ESD on log-log axes with its MP and power-law fits.

    The eigenvalues come from ``evals``, else ``report.evals``; a precomputed
    :class:`~esdwatch.schema.Log10Histogram` (``hist``, e.g. read back
    from ``spectra.jsonl``) may stand in for them. The empirical density is drawn on
    log-spaced bins (counts / (n * bin width), unnormalized eigenvalues lambda = nu^2).
    The MP density of the bulk is ``mp_pdf(lambda / N, sigma^2, Q) / N``; the power-law
    fit is the tail density ``(n_tail / n) (alpha - 1) / x_min (lambda / x_min)^-alpha``
    over ``[x_min, lambda_max]``. The title names the layer, the step, the phase and
    alpha. Without eigenvalues the fits alone are drawn.
    """
    fig = _figure(*size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    draw_esd(ax, report, evals, hist=hist, bins=bins, step=step, title=title)
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.86)
    return fig


def esd_pair_figure(
    first: LayerRecord,
    last: LayerRecord,
    *,
    first_hist: Log10Histogram | None = None,
    last_hist: Log10Histogram | None = None,
    size: tuple[float, float] = (9.0, 3.4),
    dpi: int = 90,
):
    """A layer's ESD at two snapshots (e.g. the first and the last) side by side, same x range."""
    fig = _figure(*size, dpi=dpi)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for ax, rec, hist, label in ((axes[0], first, first_hist, "first"), (axes[1], last, last_hist, "last")):
        r = rec.report
        title = f"{label} snapshot: step {rec.global_step}\n{phase_name(r.phase)}, \u03b1 = {_fmt(r.alpha)}"
        draw_esd(ax, rec, hist=hist, title=title, legend=ax is axes[1])
    lo = min(a.get_xlim()[0] for a in axes)
    hi = max(a.get_xlim()[1] for a in axes)
    for a in axes:
        a.set_xlim(lo, hi)
    fig.suptitle(first.name, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.8, wspace=0.22)
    return fig


# ------------------------------------------------------------------- phase map


def layer_order(snapshots: Iterable[Sequence[str]]) -> list[str]:
    """Layer names in model order over several snapshots (each given in model order).

    A layer that appears later is placed right after the layer that preceded it in the
    snapshot where it first appeared, so added layers slot in where they belong.
    """
    order: list[str] = []
    seen: set[str] = set()
    for names in snapshots:
        prev: str | None = None
        for name in names:
            if name not in seen:
                pos = order.index(prev) + 1 if prev is not None else 0
                if prev is None and order:
                    # first layer of this snapshot is new: before the first known layer of it
                    nxt = next((n for n in names if n in seen), None)
                    pos = order.index(nxt) if nxt is not None else len(order)
                order.insert(pos, name)
                seen.add(name)
            prev = name
    return order


def _snapshots(records: Iterable[LayerRecord]) -> list[tuple[int, list[LayerRecord]]]:
    by_step: dict[int, list[LayerRecord]] = {}
    for rec in records:
        by_step.setdefault(int(rec.global_step), []).append(rec)
    return sorted(by_step.items())


def phase_grid(
    snapshots: Sequence[tuple[int, Mapping[str, Any]]], layers: Sequence[str] | None = None
) -> tuple[list[str], list[int], np.ndarray]:
    """(layers, steps, grid) with grid[i, j] the phase ordinal of layer i at snapshot j.

    ``snapshots``: (step, {layer: phase}) in step order, each dict in model order.
    Unknown phases are ``len(PHASES)``, a layer absent from a snapshot is -1.
    """
    if layers is None:
        layers = layer_order([list(d) for _, d in snapshots])
    index = {name: i for i, name in enumerate(layers)}
    grid = np.full((len(layers), len(snapshots)), -1, dtype=np.int16)
    for j, (_, phases) in enumerate(snapshots):
        for name, phase in phases.items():
            i = index.get(name)
            if i is None:
                continue
            k = phase_ordinal(phase)
            grid[i, j] = len(PHASES) if k is None else k
    return list(layers), [int(s) for s, _ in snapshots], grid


def phase_map_figure(
    records: Iterable[LayerRecord] | None = None,
    *,
    snapshots: Sequence[tuple[int, Mapping[str, Any]]] | None = None,
    max_columns: int = 400,
    title: str = "Phase of training per layer",
    dpi: int = 100,
):
    """Layers (rows, model order) by snapshots (columns), colored by phase, with a legend.

    Give either ``records`` (any number of snapshots) or ``snapshots`` as
    ``[(step, {layer: phase}), ...]``. More than ``max_columns`` snapshots are
    subsampled evenly (the first and last are always kept).
    """
    if snapshots is None:
        snapshots = [(step, {r.name: r.report.phase for r in recs}) for step, recs in _snapshots(records or [])]
    snapshots = list(snapshots)
    if len(snapshots) > max_columns:
        idx = np.unique(np.linspace(0, len(snapshots) - 1, max_columns).round().astype(int))
        snapshots = [snapshots[i] for i in idx]
    layers, steps, grid = phase_grid(snapshots)
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names = list(PHASES) + [UNKNOWN_PHASE]
    colors = [ABSENT_COLOR] + [PHASE_COLORS[n] for n in names]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(-1.5, len(names) + 0.5), cmap.N)
    n_layers, n_cols = max(len(layers), 1), max(len(steps), 1)
    label_w = min(3.5, 0.35 + 0.056 * max((len(n) for n in layers), default=4))
    # about 2:1 whatever the counts, so that it stays legible when a dashboard scales it
    # into a card (TensorBoard's image cards are ~350 px wide); the legend sits below
    width = min(14.0, max(6.4, label_w + 1.0 + 0.16 * n_cols))
    height = min(14.0, max(3.6, 2.0 + 0.3 * min(n_layers, 12) + 0.16 * max(n_layers - 12, 0)))
    fig = _figure(width, height, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    if grid.size:
        ax.pcolormesh(
            np.arange(n_cols + 1),
            np.arange(n_layers + 1),
            grid,
            cmap=cmap,
            norm=norm,
            edgecolors="#ffffff",
            linewidth=0.5 if n_cols <= 60 else 0.0,
        )
    ax.set_ylim(n_layers, 0)
    ax.set_xlim(0, n_cols)
    ax.set_yticks(np.arange(len(layers)) + 0.5)
    ax.set_yticklabels(layers, fontsize=8 if n_layers <= 24 else (6 if n_layers <= 48 else 4))
    if steps:
        every = max(1, int(math.ceil(len(steps) / 12)))
        ticks = list(range(0, len(steps), every))
        if ticks[-1] != len(steps) - 1:
            if len(steps) - 1 - ticks[-1] < every / 2:
                ticks.pop()
            ticks.append(len(steps) - 1)
        ax.set_xticks(np.asarray(ticks) + 0.5)
        ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=7, rotation=45 if len(steps) > 8 else 0)
    ax.set_xlabel("global step (snapshot)", fontsize=8)
    ax.set_title(title, fontsize=10)
    present = set(int(v) for v in np.unique(grid)) if grid.size else set()
    handles = [
        Patch(facecolor=PHASE_COLORS[n], edgecolor="#888888", label=f"{i}: {n}" if i < len(PHASES) else n)
        for i, n in enumerate(names)
        if i < len(PHASES) or i in present
    ]
    if -1 in present:
        handles.append(Patch(facecolor=ABSENT_COLOR, edgecolor="#888888", label="not analysed"))
    ncol = 4 if width < 9 else 8
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=ncol,
        fontsize=7.5,
        frameon=False,
        bbox_to_anchor=(0.5, 0.01),
        columnspacing=1.2,
        handlelength=1.2,
    )
    legend_h = 0.2 * math.ceil(len(handles) / ncol) + 0.1
    xlabel_h = 0.6 if len(steps) > 8 else 0.45
    fig.subplots_adjust(
        left=min(0.6, label_w / width),
        right=1.0 - 0.25 / width,
        bottom=(legend_h + xlabel_h) / height,
        top=1.0 - 0.4 / height,
    )
    return fig


# ----------------------------------------------------------------- trajectories


def trajectory_figure(
    records: Iterable[LayerRecord],
    metric: str = "alpha",
    *,
    layers: Sequence[str] | None = None,
    size: tuple[float, float] = (6.4, 3.6),
    dpi: int = 100,
    title: str | None = None,
):
    """``metric`` of every layer against the global step, one line per layer."""
    snaps = _snapshots(records)
    order = list(layers) if layers is not None else layer_order([[r.name for r in recs] for _, recs in snaps])
    series: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in order}
    sigmas: dict[str, list[float]] = {name: [] for name in order}  # alpha's band
    for step, recs in snaps:
        for rec in recs:
            if rec.name not in series:
                continue
            if metric == "phase":
                k = phase_ordinal(rec.report.phase)
                v = math.nan if k is None else float(k)
            else:
                v = _num(getattr(rec.report, metric, math.nan))
            series[rec.name][0].append(step)
            series[rec.name][1].append(v)
            sigmas[rec.name].append(_num(getattr(rec.report, "alpha_sigma", math.nan)))
    fig = _figure(*size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"] if len(order) > 10 else matplotlib.colormaps["tab10"]
    for i, name in enumerate(order):
        xs, ys = series[name]
        color = cmap(i / max(len(order) - 1, 1)) if len(order) > 10 else cmap(i % 10)
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, lw=1.3, color=color, label=name)
        if metric == "alpha":  # alpha -/+ its standard error (alpha_sigma)
            y, s = np.asarray(ys, dtype=float), np.asarray(sigmas[name], dtype=float)
            ax.fill_between(xs, y - s, y + s, where=np.isfinite(y - s), color=color, alpha=0.15, lw=0)
    if metric == "alpha":
        ax.axhspan(2.0, 6.0, color="#41ab5d", alpha=0.08, lw=0)
    if metric == "phase":
        ax.set_yticks(range(len(PHASES)))
        ax.set_yticklabels(PHASES, fontsize=7)
    ax.set_xlabel("global step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per layer", fontsize=10)
    ax.grid(True, alpha=0.25)
    legend_w = 0.0
    if order and len(order) <= 20:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        legend_w = min(2.6, 0.45 + 0.048 * max(len(n) for n in order))
    fw, fh = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.75 / fw, right=max(0.45, 1.0 - (legend_w + 0.15) / fw), bottom=0.6 / fh, top=1.0 - 0.4 / fh
    )
    return fig
