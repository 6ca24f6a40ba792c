"""Figures (esdwatch.reporting.figures) and the schema helpers they draw from (histogram, phase ordinals).

Real matplotlib (Agg canvas), real analyses of synthetic matrices of known phase; the
assertions read the drawn artists and rendered pixels back.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from esdwatch import analyze_matrix
from esdwatch.engine.phases import Phase
from esdwatch.engine.synthetic import make_phase_matrix
from esdwatch.reporting import figures as F
from esdwatch.reporting.figures import layer_order
from esdwatch.schema import PHASES, LayerRecord, log10_histogram, phase_name, phase_ordinal


@pytest.fixture(scope="module")
def heavy():
    rep = analyze_matrix(
        make_phase_matrix("Heavy-Tailed", 200, 100, seed=3), name="encoder.fc1", keep_evals=True, traps=False
    )
    assert rep.phase == "Heavy-Tailed" and rep.evals is not None
    return rep


def _line(ax, prefix):
    found = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(prefix)]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


# --------------------------------------------------------------- shared helpers


def test_log10_histogram_counts_every_eigenvalue_zeros_in_the_floor_bin():
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.uniform(1.0, 100.0, 90), np.zeros(7), [-1e-13, 3e-14]])
    h = log10_histogram(ev, bins=32, floor_rel=1e-12)
    lam_max = ev.max()
    floor = lam_max * 1e-12
    assert h.counts.sum() == h.num == ev.size
    assert h.num_floor == int(np.count_nonzero(ev <= floor)) == 9
    assert h.lo == pytest.approx(math.log10(floor))
    assert h.hi == pytest.approx(math.log10(lam_max))
    assert h.counts[0] == 9  # the zeros sit in the first bin
    assert h.edges.size == 33 and h.bins == 32
    x = np.log10(np.maximum(ev, floor))
    assert h.sum == pytest.approx(x.sum()) and h.sum_squares == pytest.approx(np.dot(x, x))
    assert log10_histogram([]) is None and log10_histogram([0.0, 0.0]) is None
    flat = log10_histogram([4.0, 4.0, 4.0], bins=5)
    assert flat.counts.sum() == 3 and flat.lo < math.log10(4.0) < flat.hi
    # the dict form used by spectra.jsonl round-trips
    back = type(h).from_dict(h.to_dict())
    assert back.lo == h.lo and back.hi == h.hi and back.counts.tolist() == h.counts.tolist()


def test_phase_ordinals_are_the_phase_enum_order():
    for p in Phase:
        if p is Phase.UNKNOWN:
            assert phase_ordinal(p) is None and phase_ordinal(p.value) is None
            continue
        assert phase_ordinal(p) == p.order == PHASES.index(p.value)
        assert phase_ordinal(p.value) == p.order
        assert phase_ordinal(p.value.upper()) == p.order
        assert phase_name(p.name.lower()) == p.value
    assert phase_ordinal("unknown") is None and phase_ordinal(None) is None
    assert phase_name("not a phase") == "Unknown"


def test_layer_order_keeps_model_order_when_layers_come_and_go():
    order = layer_order([["a", "b", "c"], ["a", "x", "b", "c"], ["y", "a", "b"], ["b", "z"]])
    assert order == ["y", "a", "x", "b", "z", "c"]


# ----------------------------------------------------------------------- ESD


def test_esd_figure_draws_density_mp_fit_and_power_law_over_xmin(heavy):
    fig = F.esd_figure(LayerRecord(120, 1, 0.0, heavy))
    ax = fig.axes[0]
    title = ax.get_title()
    assert "encoder.fc1" in title and "step 120" in title
    assert "Heavy-Tailed" in title and f"{heavy.alpha:.2f}" in title
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"

    # empirical density: every eigenvalue counted, integrates to one
    (hist,) = [p for p in ax.patches if p.get_label().startswith("ESD")]
    values, edges, _ = hist.get_data()
    assert np.nansum(values * np.diff(edges)) == pytest.approx(1.0, rel=1e-9)
    assert edges[0] == pytest.approx(heavy.evals.min(), rel=1e-9)
    assert edges[-1] == pytest.approx(heavy.evals.max(), rel=1e-9)

    # power law: from x_min to lambda_max, slope -alpha on log-log axes
    pl = _line(ax, "power law")
    x, y = pl.get_xdata(), pl.get_ydata()
    assert x[0] == pytest.approx(heavy.xmin) and x[-1] == pytest.approx(heavy.lambda_max)
    slope = np.polyfit(np.log10(x), np.log10(y), 1)[0]
    assert slope == pytest.approx(-heavy.alpha, rel=1e-9)
    # normalized as the tail's share of the density: integral over the tail = n_tail / n
    tail_mass = (heavy.n_tail / heavy.num_evals) * (1 - (heavy.lambda_max / heavy.xmin) ** (1 - heavy.alpha))
    assert np.trapezoid(y, x) == pytest.approx(tail_mass, rel=0.02)

    # MP density of the bulk: ends at the fitted edges lambda_-, lambda_+; its mass is the
    # bulk's share M_b / M of the ESD (M_b: M less the spikes the fit deflated)
    mp = _line(ax, "MP fit")
    xs = mp.get_xdata()
    assert xs[0] == pytest.approx(heavy.lambda_minus, rel=1e-6)
    assert xs[-1] == pytest.approx(heavy.lambda_plus, rel=1e-6)
    sigma2, n_b, q_b, mass = F.mp_bulk(heavy)
    m_b = n_b / q_b
    assert sigma2 * (math.sqrt(n_b) + math.sqrt(m_b)) ** 2 == pytest.approx(heavy.lambda_plus)
    assert 0.5 < mass <= 1.0 and mass == pytest.approx(m_b / heavy.M)
    assert np.trapezoid(mp.get_ydata(), xs) == pytest.approx(mass, abs=0.03)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lbl.startswith("x_min") for lbl in labels) and any("MP edge" in lbl for lbl in labels)

    rgb = F.figure_to_rgb(fig)
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.std() > 10


def test_esd_figure_without_eigenvalues_draws_the_fits_and_says_so(heavy):
    fig = F.esd_figure(heavy.replace(evals=None))
    ax = fig.axes[0]
    assert not [p for p in ax.patches if p.get_label().startswith("ESD")]
    assert any("no spectrum recorded" in t.get_text() for t in ax.texts)
    _line(ax, "power law")
    _line(ax, "MP fit")


def test_esd_pair_figure_shares_the_x_range(heavy):
    early = analyze_matrix(
        make_phase_matrix("Random-like", 200, 100, seed=4), name="encoder.fc1", keep_evals=True, traps=False
    )
    fig = F.esd_pair_figure(LayerRecord(0, 0, 0.0, early), LayerRecord(500, 3, 0.0, heavy))
    left, right = fig.axes
    assert left.get_xlim() == right.get_xlim()
    assert "step 0" in left.get_title() and "Random-like" in left.get_title()
    assert "step 500" in right.get_title() and "Heavy-Tailed" in right.get_title()


# ----------------------------------------------------------------- phase map


def _records(grid, steps, names, base):
    out = []
    for j, step in enumerate(steps):
        for i, name in enumerate(names):
            k = grid[i][j]
            if k is None:
                continue
            phase = PHASES[k] if k >= 0 else "Unknown"
            out.append(LayerRecord(step, 0, 0.0, base.replace(name=name, phase=phase)))
    return out


def test_phase_map_cells_legend_and_pixels(heavy):
    names = ["embed", "block.0.attn", "block.0.mlp", "head"]
    steps = [0, 50, 100, 150]
    grid = [[0, 0, 1, 2], [0, 1, 3, 4], [0, 2, 4, 5], [None, 0, 0, -1]]  # head appears at step 50
    fig = F.phase_map_figure(_records(grid, steps, names, heavy))
    ax = fig.axes[0]
    mesh = ax.collections[0]
    drawn = np.asarray(mesh.get_array()).reshape(len(names), len(steps))
    expected = np.array([[(-1 if k is None else (len(PHASES) if k == -1 else k)) for k in row] for row in grid])
    np.testing.assert_array_equal(drawn, expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in steps]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[: len(PHASES)] == [f"{i}: {p}" for i, p in enumerate(PHASES)]
    assert "Unknown" in legend and "not analysed" in legend

    rgb = F.figure_to_rgb(fig)
    height = rgb.shape[0]
    for i, row in enumerate(grid):
        for j, k in enumerate(row):
            x, y = ax.transData.transform((j + 0.5, i + 0.5))
            pixel = rgb[int(round(height - y)), int(round(x))].astype(int)
            name = "Unknown" if k == -1 else (PHASES[k] if k is not None else None)
            color = F.PHASE_COLORS[name] if name else F.ABSENT_COLOR
            want = np.array([int(color[c : c + 2], 16) for c in (1, 3, 5)])
            assert np.abs(pixel - want).max() <= 3, (names[i], steps[j], pixel, color)


def test_phase_map_subsamples_columns_keeping_first_and_last(heavy):
    snaps = [(s, {"a": "Random-like", "b": "Heavy-Tailed"}) for s in range(0, 1000, 2)]
    fig = F.phase_map_figure(snapshots=snaps, max_columns=50)
    ax = fig.axes[0]
    n_cols = np.asarray(ax.collections[0].get_array()).size // 2
    assert n_cols == 50
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "0" and ticks[-1] == "998"


def test_trajectory_figure_one_line_per_layer_with_the_values(heavy):
    names = ["l0", "l1", "l2"]
    recs = [
        LayerRecord(s, 0, 0.0, heavy.replace(name=n, alpha=2.0 + i + s / 100))
        for s in (0, 100, 200)
        for i, n in enumerate(names)
    ]
    fig = F.trajectory_figure(recs, "alpha")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == names
    for i, n in enumerate(names):
        np.testing.assert_allclose(lines[n].get_xdata(), [0, 100, 200])
        np.testing.assert_allclose(lines[n].get_ydata(), [2.0 + i, 3.0 + i, 4.0 + i])
    assert ax.get_ylabel() == "alpha"


def test_without_matplotlib_figures_name_the_extra_and_the_tensorboard_sink_still_writes(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, logging
        sys.modules["matplotlib"] = None  # as if it were not installed
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        import numpy as np
        from esdwatch.reporting import figures as F
        try:
            F.require_matplotlib()
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        from torch.utils.tensorboard import SummaryWriter
        from esdwatch.schema import LayerRecord
        from esdwatch.schema import LayerReport
        from esdwatch.sinks.tensorboard import TensorBoardSink
        w = SummaryWriter({str(tmp_path)!r})
        sink = TensorBoardSink(w, figure_every=1)
        rep = LayerReport(name="fc", kind="linear", N=80, M=60, Q=80 / 60, alpha=3.5, phase="Heavy-Tailed",
                          evals=np.linspace(1, 10, 60))
        sink.write([LayerRecord(5, 0, 0.0, rep)], 5)
        sink.close(); w.close()
        print("WROTE", sink.snapshots, sink.figures)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "IMPORT-ERROR: esdwatch figures need matplotlib: pip install 'esdwatch[plot]'" in text
    assert "WROTE 1 False" in text
    assert "esdwatch[plot]" in out.stderr  # the sink's one warning
