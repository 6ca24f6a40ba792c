"""Alarms as data: one test per default alarm, plus rules, gating and serialization."""

from __future__ import annotations

import json
import math

import pytest
import torch

from esdwatch.alarms import (
    ALPHA_HIGH,
    ALPHA_LOW,
    CORRELATION_TRAP,
    DEFAULT_RULES,
    NON_FINITE,
    RANK_COLLAPSE,
    Alarm,
    AlarmRule,
    evaluate_alarms,
)
from esdwatch.engine import synthetic
from esdwatch.engine.analyzer import analyze_matrix
from esdwatch.engine.model_report import ModelReport
from esdwatch.schema import LayerReport


def layer(name: str = "L", **fields) -> LayerReport:
    base = dict(
        name=name,
        kind="linear",
        N=200,
        M=100,
        Q=2.0,
        lambda_max=10.0,
        alpha=3.0,
        rank_collapse_fraction=0.0,
        num_traps=0,
    )
    base.update(fields)
    return LayerReport(**base)


def kinds(alarms) -> list[str]:
    return sorted(a.kind for a in alarms)


def test_healthy_layer_raises_nothing():
    assert evaluate_alarms([layer()]) == []


def test_alpha_low_and_high():
    low = evaluate_alarms([layer(alpha=1.7, D=0.05)])
    assert kinds(low) == [ALPHA_LOW]
    a = low[0]
    assert a.value == pytest.approx(1.7) and a.threshold == 2.0 and a.severity == "info"  # alpha_crossing warns
    assert a.layer == "L" and "alpha" in a.message and a.extra["D"] == pytest.approx(0.05)
    high = evaluate_alarms([layer(alpha=7.5)])
    assert kinds(high) == [ALPHA_HIGH] and high[0].severity == "info"
    assert evaluate_alarms([layer(alpha=float("nan"))]) == []  # no fit, no alarm


def test_correlation_trap_from_a_real_analysis():
    W = torch.randn(400, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    W[7, 9] = 80.0
    rep = analyze_matrix(W, name="fc")
    alarms = [a for a in evaluate_alarms([rep]) if a.kind == CORRELATION_TRAP]
    assert len(alarms) == 1
    a = alarms[0]
    assert a.value == 1 and a.threshold == 1 and a.layer == "fc"
    assert "(7,9)=80" in a.message and a.extra["entries"].startswith("(7,9)=80")
    assert a.extra["rand_lambda_max"] > a.extra["rand_lambda_plus"]
    clean = analyze_matrix(torch.randn(400, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert CORRELATION_TRAP not in kinds(evaluate_alarms([clean]))


def test_rank_collapse_from_dead_units():
    W = synthetic.rank_collapse(300, 150, seed=0, mode="dead_units", dead_fraction=0.6)
    rep = analyze_matrix(W, name="dead", traps=False)
    assert rep.phase == "Rank-collapse"
    alarms = [a for a in evaluate_alarms([rep]) if a.kind == RANK_COLLAPSE]
    assert len(alarms) == 1
    a = alarms[0]
    assert a.value == pytest.approx(0.6) and a.threshold == 0.25 and a.severity == "error"
    assert a.extra["phase"] == "Rank-collapse" and a.extra["dead_units"] == 90
    assert "90 dead units" in a.message


def test_rank_collapse_alarm_follows_the_phase():
    # the phase (which also requires the zero cluster to be separated) gates the alarm
    assert kinds(evaluate_alarms([layer(rank_collapse_fraction=0.4, phase="Rank-collapse")])) == [RANK_COLLAPSE]
    assert evaluate_alarms([layer(rank_collapse_fraction=0.4, phase="Heavy-Tailed")]) == []
    # without a phase the threshold alone decides
    assert kinds(evaluate_alarms([layer(rank_collapse_fraction=0.4)])) == [RANK_COLLAPSE]
    assert evaluate_alarms([layer(rank_collapse_fraction=0.2)]) == []


def test_very_heavy_tailed_layer_does_not_alarm_rank_collapse():
    rep = analyze_matrix(synthetic.heavy_tailed(256, 256, seed=3, mu=1.0), traps=False)
    assert rep.rank_collapse_fraction > 0.25  # many eigenvalues < 1e-6 lambda_max ...
    assert rep.phase == "Heavy-Tailed"  # ... but a continuous heavy tail, not a spike at 0
    assert RANK_COLLAPSE not in kinds(evaluate_alarms([rep]))
    assert ALPHA_LOW in kinds(evaluate_alarms([rep]))


def test_all_zero_layer_is_rank_collapse():
    rep = analyze_matrix(torch.zeros(100, 60), name="zero")
    assert rep.status == "degenerate"
    alarms = evaluate_alarms([rep])
    assert kinds(alarms) == [RANK_COLLAPSE]
    assert alarms[0].value == 1.0 and alarms[0].severity == "error" and "all-zero" in alarms[0].message


def test_non_finite_weights():
    W = torch.randn(100, 60)
    W[3, 4] = float("nan")
    W[5, 6] = float("inf")
    rep = analyze_matrix(W, name="bad")
    alarms = evaluate_alarms([rep], step=12)
    assert kinds(alarms) == [NON_FINITE]
    a = alarms[0]
    assert a.value == 2 and a.severity == "error" and a.step == 12 and a.layer == "bad"


def test_model_report_alarms_and_serialization():
    report = ModelReport(layers=(layer("a", alpha=1.5), layer("b", num_traps=2, trap_entries="(1,2)=9"), layer("c")))
    alarms = report.alarms()
    assert [(a.layer, a.kind) for a in alarms] == [("a", ALPHA_LOW), ("b", CORRELATION_TRAP)]
    for a in alarms:
        d = a.to_dict()
        json.dumps(d)
        assert Alarm.from_dict(d) == a
    assert Alarm.from_dict({"kind": "x", "layer": "l", "value": None, "threshold": None, "message": "m"}).value != 0


def test_custom_rules_and_step():
    rules = [
        AlarmRule("stable_rank_low", "stable_rank", 5.0, above=False, severity="info"),
        AlarmRule("alpha_ge_3", "alpha", 3.0, inclusive=True),
    ]
    alarms = evaluate_alarms([layer(stable_rank=2.0, alpha=3.0)], rules, step=7)
    assert kinds(alarms) == ["alpha_ge_3", "stable_rank_low"]
    assert all(a.step == 7 for a in alarms)
    assert "<" in [a for a in alarms if a.kind == "stable_rank_low"][0].message
    assert evaluate_alarms([layer(alpha=3.0)], [AlarmRule("x", "alpha", 3.0)]) == []  # strict by default
    assert evaluate_alarms([layer()], [AlarmRule("x", "no_such_field", 0.0)]) == []
    assert {r.kind for r in DEFAULT_RULES} == {RANK_COLLAPSE, CORRELATION_TRAP, ALPHA_LOW, ALPHA_HIGH}


def test_failed_layers_are_skipped():
    assert evaluate_alarms([layer(status="failed", alpha=1.0)]) == []
    assert math.isnan(Alarm("k", "l", float("nan"), 1.0, "m").value)
