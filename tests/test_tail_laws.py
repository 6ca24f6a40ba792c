"""Tail laws (fit="TPL"/"E_TPL", best_fit), the exponential-tail phase evidence, and alpha's bootstrap interval."""

import importlib.util
import math
import sys

import numpy as np
import pytest

import esdwatch
from esdwatch.engine import synthetic
from esdwatch.engine.phases import Phase, PhaseThresholds, _tail_check, classify
from esdwatch.engine.powerlaw import fit_power_law
from esdwatch.engine.tail_laws import bootstrap_alpha, check_fit, compare_tail_laws

HAVE_POWERLAW = importlib.util.find_spec("powerlaw") is not None
needs_powerlaw = pytest.mark.skipif(not HAVE_POWERLAW, reason="powerlaw not installed")


def _pareto(rng, n, alpha, xmin=1.0):
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@needs_powerlaw
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compare_tail_laws_is_powerlaw_on_the_same_tail():
    import powerlaw

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.random(300), 2.0 + rng.exponential(1.5, 300)])
    xmin = 2.0 + float(np.sort(x[x >= 2])[5] - 2.0)
    laws = compare_tail_laws(x, xmin)
    ref = powerlaw.Fit(x, xmin=xmin, parameter_ranges={"alpha": [1, 100]}, verbose=False)
    assert laws.tpl_alpha == pytest.approx(ref.truncated_power_law.alpha, rel=1e-12)
    assert laws.tpl_lambda == pytest.approx(ref.truncated_power_law.Lambda, rel=1e-12)
    for law, name in (("TPL", "truncated_power_law"), ("lognormal", "lognormal"), ("exponential", "exponential")):
        R, p = ref.distribution_compare("power_law", name, normalized_ratio=True)
        assert laws.R[law] == pytest.approx(R, rel=1e-12, abs=1e-12)
        assert laws.p[law] == pytest.approx(p, rel=1e-12, abs=1e-12)
    assert laws.best_fit == "exponential"  # an exponential tail


@needs_powerlaw
@pytest.mark.parametrize(
    ("law", "expected"),
    [("PL", "PL"), ("TPL", "TPL"), ("exponential", "exponential")],
)
def test_best_fit_of_clear_tails(law, expected):
    rng = np.random.default_rng(11)
    if law == "PL":
        x = _pareto(rng, 1000, 2.5)
    elif law == "TPL":  # alpha 1.5 cut off at 1 / Lambda = 20
        x = _pareto(rng, 40000, 1.5)
        x = x[rng.random(x.size) < np.exp(-(x - 1.0) / 20.0)][:1000]
    else:
        x = 1.0 + rng.exponential(2.0, 1000)
    assert compare_tail_laws(x, 1.0).best_fit == expected


@needs_powerlaw
def test_too_short_a_tail_is_not_compared():
    laws = compare_tail_laws(np.array([1.0, 2.0, 3.0, 4.0]), 1.0)
    assert laws.best_fit == "" and "tail point" in laws.reason
    assert math.isnan(laws.report_fields()["fit_R_tpl"])


def test_fit_option_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="fit must be one of"):
        check_fit("tpl")
    with pytest.raises(ValueError, match="fit must be one of"):
        esdwatch.analyze_matrix(np.eye(60), fit="XX")
    # the bare package: fit="PL" never needs powerlaw; TPL says which extra to install
    monkeypatch.setitem(sys.modules, "powerlaw", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "powerlaw" else object())
    report = esdwatch.analyze_matrix(synthetic.heavy_tailed(200, 100, seed=0), traps=False, alpha_ci=False)
    assert report.ok and report.best_fit == "" and math.isnan(report.tpl_alpha)
    with pytest.raises(ImportError, match=r"esdwatch\[fits\]"):
        check_fit("TPL")


@needs_powerlaw
def test_analyze_matrix_fills_the_tail_law_fields():
    W = synthetic.heavy_tailed(400, 200, seed=2, mu=1.5)
    pl = esdwatch.analyze_matrix(W, traps=False)
    tpl = esdwatch.analyze_matrix(W, traps=False, fit="TPL")
    assert tpl.alpha == pl.alpha and tpl.xmin == pl.xmin  # alpha stays the power law's
    assert tpl.best_fit in ("PL", "TPL", "lognormal", "exponential")
    assert math.isfinite(tpl.tpl_alpha) and tpl.tpl_lambda >= 0
    assert all(math.isfinite(getattr(tpl, f"fit_p_{law}")) for law in ("tpl", "lognormal", "exponential"))
    etpl = esdwatch.analyze_matrix(W, traps=False, fit="E_TPL")
    assert etpl.xmin == esdwatch.analyze_matrix(W, traps=False, fix_fingers=True).xmin
    assert tpl.to_dict()["best_fit"] == tpl.best_fit


# ------------------------------------------------------------------- phase evidence


def test_an_exponential_tail_is_evidence_against_heavy_tailed():
    W = synthetic.heavy_tailed(512, 256, seed=1, mu=1.5)
    ev = np.sort(np.linalg.eigvalsh(W.double().numpy().T @ W.double().numpy()))
    assert classify(ev, 512, 256).phase is Phase.HEAVY_TAILED
    pl = fit_power_law(ev)
    power_law = {"alpha": pl.alpha, "xmin": pl.xmin, "D": pl.D, "n_tail": pl.n_tail, "best_fit": "exponential"}
    res = classify(ev, 512, 256, power_law=power_law)
    assert res.phase is not Phase.HEAVY_TAILED
    assert "tail" in res.reason
    th = PhaseThresholds()
    assert _tail_check(-2.0, 0.04, "", th)[0] is False  # the exponential is significantly better
    assert _tail_check(-1.0, 0.3, "", th)[0] is True  # not significant
    assert _tail_check(3.0, 0.001, "", th) == (True, 1.0)  # the power law is better
    assert _tail_check(float("nan"), float("nan"), "PL", th) == (True, 1.0)


# --------------------------------------------------------------------- uncertainty


def test_alpha_sigma_and_bootstrap_match_the_spread_over_draws():
    """Over repeated draws of one power law (alpha 2.5, n = 500), the spread of the fitted
    alpha is what alpha_sigma and the bootstrap say it is (within 20%).

    alpha_sigma is the standard error at a known x_min; with x_min scanned the spread is
    larger (here by about a third), which the bootstrap, re-scanning x_min, captures."""
    rng = np.random.default_rng(7)
    fixed = [fit_power_law(_pareto(rng, 500, 2.5), xmin=1.0) for _ in range(300)]
    fixed_spread = float(np.std([f.alpha for f in fixed], ddof=1))
    assert np.median([f.sigma for f in fixed]) == pytest.approx(fixed_spread, rel=0.2)
    fits = [fit_power_law(_pareto(rng, 500, 2.5)) for _ in range(300)]
    spread = float(np.std([f.alpha for f in fits], ddof=1))
    assert np.median([f.sigma for f in fits]) < 0.9 * spread
    boot_sd = [bootstrap_alpha(_pareto(rng, 500, 2.5), n_boot=100, seed=s).sd for s in range(8)]
    assert np.median(boot_sd) == pytest.approx(spread, rel=0.2)
    interval = bootstrap_alpha(_pareto(rng, 500, 2.5), n_boot=100)
    assert interval.low < interval.high
    assert (interval.high - interval.low) / (2 * 1.96) == pytest.approx(spread, rel=0.35)


def test_bootstrap_interval_through_analyze():
    W = synthetic.heavy_tailed(300, 150, seed=4, mu=1.5)
    report = esdwatch.analyze_matrix(W, traps=False, alpha_ci=True)
    assert report.alpha_ci_low <= report.alpha <= report.alpha_ci_high
    assert math.isnan(esdwatch.analyze_matrix(W, traps=False).alpha_ci_low)
    with pytest.raises(ValueError):
        bootstrap_alpha(np.arange(10.0), n_boot=1)
    assert math.isnan(bootstrap_alpha(np.array([1.0, 2.0])).low)


# ------------------------------------------------------------------- CLI and monitor


@needs_powerlaw
def test_cli_fit_and_alpha_ci_columns(tmp_path, capsys):
    import torch

    from esdwatch.cli import main

    path = tmp_path / "w.pt"
    torch.save({"fc.weight": synthetic.heavy_tailed(200, 100, seed=5, mu=1.5).float()}, path)
    assert main(["analyze", str(path)]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert "alpha_sigma" in header and "best_fit" not in header and "alpha_ci_low" not in header
    assert main(["analyze", str(path), "--fit", "TPL", "--alpha-ci"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert {"alpha_sigma", "alpha_ci_low", "alpha_ci_high", "best_fit"} <= set(header)
    assert lines[3].split()[header.index("best_fit")] in ("PL", "TPL", "lognormal", "exponential")


def test_monitor_option_is_checked():
    from esdwatch.monitor.options import AnalysisOptions

    with pytest.raises(ValueError, match="fit must be one of"):
        AnalysisOptions(fit="pl")
    assert AnalysisOptions().config(keep_evals=False).fit == "PL"
    if HAVE_POWERLAW:
        assert AnalysisOptions(fit="E_TPL").config(keep_evals=False).fit == "E_TPL"


# ----------------------------------------------------------------------- reporting


def _record(step, **fields):
    from esdwatch.schema import LayerRecord, LayerReport

    report = LayerReport(name="fc", kind="linear", N=200, M=100, Q=2.0, alpha=2.5, alpha_sigma=0.2, **fields)
    return LayerRecord(global_step=step, epoch=0, wall_time=0.0, report=report)


def test_alpha_sigma_and_best_fit_are_shown():
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    from esdwatch.reporting.figures import trajectory_figure
    from esdwatch.reporting.html import _sigma_cell
    from esdwatch.reporting.summary import layer_table

    plain = layer_table([_record(1)])
    assert "2.50\u00b10.20" in plain and "best_fit" not in plain
    table = layer_table([_record(1, best_fit="TPL")]).splitlines()
    assert table[0].split()[4] == "best_fit" and "TPL" in table[2].split()
    assert _sigma_cell(_record(1).report) == "&plusmn; 0.200"
    assert "[2.100, 2.900]" in _sigma_cell(_record(1, alpha_ci_low=2.1, alpha_ci_high=2.9).report)
    fig = trajectory_figure([_record(1), _record(2)], "alpha")
    assert any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)  # the alpha -/+ sigma band


@needs_powerlaw
def test_a_failing_comparison_keeps_the_layer(monkeypatch, caplog):
    import esdwatch.engine.tail_laws as tail_laws

    def boom(*args, **kwargs):
        raise FloatingPointError("overflow")

    monkeypatch.setattr(tail_laws, "compare_tail_laws", boom)
    report = esdwatch.analyze_matrix(synthetic.heavy_tailed(200, 100, seed=0), traps=False, fit="TPL")
    assert report.ok and math.isfinite(report.alpha) and report.best_fit == ""
    assert "tail-law comparison failed" in caplog.text
