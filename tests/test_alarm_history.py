"""History rules (issue 16): each default rule on synthetic histories: fires, does not fire, patience.

A history is a list of :class:`Snapshot` (layer -> metric -> value), so no model or Trainer
is needed; the policy tests feed LayerReports through :class:`AlarmPolicy` as the monitor does.
"""

from __future__ import annotations

import math

import pytest

from esdwatch.alarms import (
    ALPHA_CROSSING,
    ALPHA_LOW,
    CORRELATION_FLOW,
    DEFAULT_HISTORY_RULES,
    NEW_TRAPS,
    SCALE_COLLAPSE,
    AlarmPolicy,
    AlarmRule,
    AlphaCrossingRule,
    CorrelationFlowRule,
    NewTrapsRule,
    ScaleJumpRule,
    Snapshot,
    evaluate_history,
    replay,
)
from esdwatch.schema import LayerRecord, LayerReport


def snaps(series: dict[str, dict[str, list[float]]], every: int = 10) -> list[Snapshot]:
    """layer -> metric -> values over time, as snapshots at steps 0, every, 2 every ..."""
    n = len(next(iter(next(iter(series.values())).values())))
    return [
        Snapshot(i * every, {layer: {m: float(v[i]) for m, v in ms.items()} for layer, ms in series.items()})
        for i in range(n)
    ]


def fired_on_last(rule, history) -> list[tuple[str, str]]:
    return [(a.kind, a.layer) for a in rule.check_history(history)]


def three(metric: str, a: list[float], b: list[float], c: list[float]) -> dict[str, dict[str, list[float]]]:
    return {"fc1": {metric: a}, "fc2": {metric: b}, "fc3": {metric: c}}


# ------------------------------------------------------------------ scale collapse


def test_scale_jump_fires_on_the_layer_that_moved_against_the_others():
    h = snaps(three("log_spectral_norm", [1.0, 1.0, 1.05, 1.1], [1.0, 0.9, 0.5, 0.2], [0.8, 0.82, 0.85, 0.9]))
    alarms = ScaleJumpRule().check_history(h)
    assert [(a.kind, a.layer) for a in alarms] == [(SCALE_COLLAPSE, "fc2")]
    a = alarms[0]
    assert a.value == pytest.approx(-0.8 - 0.1) and a.threshold == 0.5 and a.severity == "warning"
    assert a.extra["compared"] == [0, 30] and a.extra["from"] == 1.0 and a.extra["to"] == pytest.approx(0.2)
    assert "down" in a.message and "step 0" in a.message


def test_scale_jump_ignores_layers_moving_together_and_small_moves():
    together = snaps(three("log_spectral_norm", [0.0, 0.5, 1.0, 1.5], [0.0, 0.5, 1.0, 1.6], [0.1, 0.6, 1.1, 1.5]))
    assert fired_on_last(ScaleJumpRule(), together) == []  # training moves every layer's scale
    small = snaps(three("log_spectral_norm", [1.0, 1.0, 1.0, 1.0], [1.0, 1.1, 1.2, 1.4], [1.0, 1.0, 1.0, 1.0]))
    assert fired_on_last(ScaleJumpRule(), small) == []
    assert fired_on_last(ScaleJumpRule(threshold=0.3), small) == [(SCALE_COLLAPSE, "fc2")]
    assert fired_on_last(ScaleJumpRule(), small[:1]) == []  # one snapshot: no history yet


# ------------------------------------------------------------------ alpha crossing 2


def test_alpha_crossing_fires_on_a_drop_through_2_not_on_a_slow_drift_or_a_layer_always_below():
    h = snaps(
        {"a": {"alpha": [2.6, 2.5, 2.2, 1.8]}, "drift": {"alpha": [2.1, 2.05, 2.02, 1.98]}, "low": {"alpha": [1.5] * 4}}
    )
    alarms = AlphaCrossingRule().check_history(h)
    assert [(a.kind, a.layer) for a in alarms] == [(ALPHA_CROSSING, "a")]
    assert alarms[0].extra["from"] == 2.6 and alarms[0].extra["to"] == 1.8 and alarms[0].value == 1.8
    assert fired_on_last(AlphaCrossingRule(min_drop=0.0), h) == [(ALPHA_CROSSING, "a"), (ALPHA_CROSSING, "drift")]
    nan = snaps({"a": {"alpha": [2.6, math.nan, 2.2, math.nan]}})
    assert fired_on_last(AlphaCrossingRule(), nan) == []


# ------------------------------------------------------------------ new traps


def test_new_traps_fire_where_there_were_none():
    h = snaps(three("num_traps", [0, 0, 0, 5], [0, 0, 1, 1], [3, 3, 3, 4]))
    alarms = NewTrapsRule().check_history(h)
    assert [(a.kind, a.layer) for a in alarms] == [(NEW_TRAPS, "fc1")]  # fc2: one trap only; fc3: had some
    assert alarms[0].value == 5 and alarms[0].extra["from"] == 0
    assert fired_on_last(NewTrapsRule(min_traps=1), h) == [(NEW_TRAPS, "fc1"), (NEW_TRAPS, "fc2")]
    off = snaps(three("num_traps", [-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]))
    assert fired_on_last(NewTrapsRule(), off) == []  # the trap test was off


# ------------------------------------------------------------------ correlation flow


def test_correlation_flow_fires_on_the_layer_that_breaks_from_its_neighbours():
    h = snaps(three("alpha", [3.0, 2.9, 2.9, 2.8], [3.0, 3.5, 4.5, 5.0], [3.1, 3.0, 3.0, 2.9]))
    alarms = CorrelationFlowRule().check_history(h)
    assert [(a.kind, a.layer) for a in alarms] == [(CORRELATION_FLOW, "fc2")]
    assert alarms[0].value == pytest.approx(2.0 - (-0.2 - 0.2) / 2) and alarms[0].extra["neighbours"] == ["fc1", "fc3"]


def test_correlation_flow_ignores_layers_moving_together_and_random_like_alphas():
    together = snaps(three("alpha", [5.0, 4.0, 3.0, 2.5], [5.5, 4.5, 3.2, 2.6], [5.0, 4.0, 3.0, 2.4]))
    assert fired_on_last(CorrelationFlowRule(), together) == []
    early = snaps(three("alpha", [6.8, 6.5, 4.0, 3.6], [11.8, 12.0, 7.0, 3.3], [5.6, 3.4, 3.0, 2.7]))
    assert fired_on_last(CorrelationFlowRule(), early) == []  # fc2 started random-like (alpha > 6)
    two = snaps({"fc1": {"alpha": [3.7, 3.9, 4.0, 5.3]}, "fc2": {"alpha": [3.1, 3.2, 3.3, 3.3]}})
    assert fired_on_last(CorrelationFlowRule(), two) == []  # two layers: which one broke?
    assert fired_on_last(CorrelationFlowRule(min_layers=2), two) == [(CORRELATION_FLOW, "fc1")]


# ------------------------------------------------------------------ through the policy


def report(name: str, **fields) -> LayerReport:
    base = dict(name=name, kind="linear", N=200, M=100, Q=2.0, lambda_max=10.0, alpha=3.0, num_traps=0)
    base.update(fields, log_spectral_norm=fields.get("log_spectral_norm", 1.0))
    return LayerReport(**base)


def test_patience_a_lasting_change_fires_once_a_blip_does_not():
    norms = [1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]  # fc2 drops at snapshot 4 and stays

    def fired(policy: AlarmPolicy) -> list[tuple[int, str, str]]:
        return [
            (step, a.kind, a.layer)
            for step, v in enumerate(norms)
            for a in policy.update([report("fc1"), report("fc2", log_spectral_norm=v), report("fc3")], step)
        ]

    assert fired(AlarmPolicy(phase_transitions=False)) == [(4, SCALE_COLLAPSE, "fc2")]  # default patience 1
    patient = AlarmPolicy(phase_transitions=False, patience={SCALE_COLLAPSE: 2})
    assert fired(patient) == [(5, SCALE_COLLAPSE, "fc2")]  # raised at 4, confirmed at 5, once per episode
    blip = [1.0, 1.0, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0]  # back at once: the comparison flips
    policy = AlarmPolicy(phase_transitions=False, patience={SCALE_COLLAPSE: 3})
    out = [a for s, v in enumerate(blip) for a in policy.update([report("fc1"), report("fc2", log_spectral_norm=v)], s)]
    assert out == []


def test_policy_history_survives_a_checkpoint_and_alarms_carry_advice():
    policy = AlarmPolicy(phase_transitions=False)
    for s in range(4):
        policy.update([report("fc1"), report("fc2", num_traps=0), report("fc3")], s)
    policy.update([report("fc1"), report("fc2", num_traps=4), report("fc3")], 4)
    restored = AlarmPolicy(phase_transitions=False)
    restored.load_state_dict(policy.state_dict())
    fired = restored.update([report("fc1"), report("fc2", num_traps=4), report("fc3")], 5)
    new = [a for a in fired if a.kind == NEW_TRAPS]
    assert [a.layer for a in new] == ["fc2"]
    a = new[0]
    assert "learning rate" in a.advice and "fc2" in a.advice
    assert a.extra["consecutive"] == 2 and a.extra["compared"] == [2, 5]
    assert a.to_dict()["advice"] == a.advice


def test_rules_given_replace_both_defaults_and_bad_rules_are_refused():
    only_static = AlarmPolicy(rules=[AlarmRule("alpha_low", "alpha", 2.0, above=False)])
    assert only_static.history_rules == () and len(only_static.rules) == 1
    only_history = AlarmPolicy(rules=[NewTrapsRule()])
    assert only_history.rules == () and only_history.history_rules == (NewTrapsRule(),)
    assert AlarmPolicy().history_rules == DEFAULT_HISTORY_RULES
    with pytest.raises(TypeError, match="AlarmRule or a HistoryRule"):
        AlarmPolicy(rules=["alpha < 2"])  # type: ignore[list-item]


def test_replay_of_records_equals_the_live_policy():
    records = [
        LayerRecord(step, 0, 0.0, report(n, log_spectral_norm=(0.1 if n == "fc2" and step >= 40 else 1.0)))
        for step in range(0, 100, 10)
        for n in ("fc1", "fc2", "fc3")
    ]
    fired = replay(records)
    assert [(a.step, a.kind, a.layer) for a in fired if a.kind != "phase_transition"] == [(40, SCALE_COLLAPSE, "fc2")]
    assert evaluate_history([]) == []


# the README demo (python -m esdwatch.demo, validation accuracy 0.953) as the monitor recorded it:
# 25 snapshots every 15 steps; net.0 drifts below alpha 2 and shows one marginal trap on and off
DEMO = {
    "net.0": {
        "alpha": [6.8, 6.79, 6.3, 3.6, 2.98, 2.65, 2.43, 2.26, 2.2, 2.14, 2.1, 2.05, 2.04, 2.01, 1.98, 1.94, 1.92]
        + [1.91, 1.9, 1.88, 1.88, 1.88, 1.87, 1.86, 1.86],
        "log_spectral_norm": [0.465, 0.465, 0.526, 0.793, 1.005, 1.076, 1.192, 1.237, 1.291, 1.32, 1.367, 1.377]
        + [1.409, 1.459, 1.498, 1.515, 1.544, 1.568, 1.575, 1.586, 1.601, 1.609, 1.622, 1.621, 1.623],
        "num_traps": [0] * 15 + [1, 1, 1, 1, 1, 0, 1, 0, 0, 0],
    },
    "net.2": {
        "alpha": [11.76, 12.06, 7.27, 3.32, 2.76, 2.63, 2.53, 2.49, 2.4, 2.33, 2.29, 2.28, 2.24, 2.28, 2.21, 2.2]
        + [2.18, 2.16, 2.13, 2.16, 2.12, 2.12, 2.12, 2.12, 2.14],
        "log_spectral_norm": [0.115, 0.118, 0.331, 0.685, 0.807, 0.871, 0.96, 0.99, 1.024, 1.042, 1.078, 1.099]
        + [1.12, 1.147, 1.17, 1.219, 1.222, 1.23, 1.234, 1.245, 1.257, 1.261, 1.271, 1.266, 1.279],
        "num_traps": [0] * 25,
    },
    "net.4": {
        "alpha": [5.62, 3.42, 5.05, 2.71, 2.46, 2.3, 2.28, 2.24, 2.17, 2.2, 2.17, 2.12, 2.11, 2.11, 2.11, 2.09]
        + [2.1, 2.1, 2.11, 2.1, 2.08, 2.07, 2.14, 2.08, 2.06],
        "log_spectral_norm": [-0.024, -0.022, 0.278, 0.677, 0.809, 0.832, 0.9, 0.921, 0.931, 0.938, 0.967, 0.959]
        + [0.971, 0.974, 0.999, 1.023, 1.005, 1.013, 1.01, 1.016, 1.026, 1.031, 1.042, 1.048, 1.03],
        "num_traps": [0] * 25,
    },
}


def test_the_readme_demo_raises_no_warning_and_alpha_above_6_at_init_is_informational():
    records = [
        LayerRecord(
            15 * i,
            0,
            0.0,
            report(
                name,
                alpha=m["alpha"][i],
                log_spectral_norm=m["log_spectral_norm"][i],
                num_traps=m["num_traps"][i],
                phase="Random-like" if m["alpha"][i] > 6 else "Heavy-Tailed",
            ),
        )
        for i in range(25)
        for name, m in DEMO.items()
    ]
    fired = replay(records)
    assert [a for a in fired if a.severity != "info"] == []
    high = [a for a in fired if a.kind == "alpha_high"]
    assert [(a.layer, a.step) for a in high] == [("net.0", 15), ("net.2", 15)]  # the two Random-like layers at init
    assert all("expected early in training" in a.advice for a in high)
    assert {a.kind for a in fired} == {"alpha_high", "alpha_low", "correlation_trap", "phase_transition"}


def test_the_end_of_run_summary_says_why_and_what_to_do():
    from esdwatch.alarms import advise
    from esdwatch.reporting.summary import run_summary

    warn = advise(
        ScaleJumpRule().check_history(snaps(three("log_spectral_norm", [1, 1, 1, 1], [1, 1, 0.5, 0.2], [1] * 4)))[0]
    )
    info = advise(evaluate_alarms_one(alpha=7.0))
    text = run_summary([], [info, warn], snapshots=4, skipped=0, skipped_steps=[])
    assert "[scale_collapse] step 30: fc2: log10 lambda_max moved down by -0.80 since step 0" in text
    assert "advice: fc2's scale moved against the other layers'" in text
    assert "[alpha_high]" not in text  # informational alarms are counted, not explained


def evaluate_alarms_one(**fields):
    from esdwatch.alarms import evaluate_alarms

    return evaluate_alarms([report("fc1", **fields)], step=0)[0]


# ------------------------------------------------------------------ under a layer rotation


def _rotate(policy: AlarmPolicy, layers: list[str], per: int, values, snapshots: int, replayed: bool = False):
    """Feed ``snapshots`` snapshots of a rotation (``per`` layers each, round-robin), as the
    monitor does (the layers not analysed are ``kept``); ``values(layer, k)``: the fields of
    ``layer`` at snapshot k. Returns (step, kind, layer) of every alarm fired."""
    out, records = [], []
    for k in range(snapshots):
        step = 10 * k
        names = [layers[(k * per + i) % len(layers)] for i in range(per)]
        reports = [report(n, **values(n, k)) for n in names]
        records += [LayerRecord(step, 0, 0.0, r) for r in reports]
        if not replayed:
            kept = [n for n in layers if n not in names]
            out += [(step, a.kind, a.layer) for a in policy.update(reports, step, kept=kept)]
    if replayed:
        out = [(a.step, a.kind, a.layer) for a in replay(records, policy)]
    return out


@pytest.mark.parametrize("replayed", [False, True])
def test_history_rules_judge_each_layer_against_its_own_earlier_analyses_under_a_rotation(replayed):
    """2 of 8 layers per snapshot: each layer is analysed every fourth snapshot, so the
    snapshot 3 back never holds the layers of the current one; each layer is compared with
    its own analysis ``window`` analyses back. Replayed records (read back from a run
    directory) fire the same alarms as the live policy."""
    layers = [f"fc{i}" for i in range(8)]

    def values(name, k):  # fc3 (analysed at snapshots 1, 5, 9, 13, ...) falls through 2 from 9 on
        return {"alpha": 1.7 if name == "fc3" and k >= 9 else 2.6}

    got = _rotate(AlarmPolicy(phase_transitions=False), layers, 2, values, 21, replayed)
    # raised at fc3's analysis of snapshot 9, confirmed (patience 2) at its next one, 13: that
    # one compares with fc3's own analysis 3 analyses back (snapshot 1), 2.6 -> 1.7
    assert got == [(130, ALPHA_LOW, "fc3"), (130, ALPHA_CROSSING, "fc3")]


def test_under_a_rotation_layers_growing_together_are_no_scale_collapse_but_one_layer_is():
    layers = [f"fc{i}" for i in range(8)]

    def together(name, k):  # every layer's lambda_max grows steadily, each analysed every 4th snapshot
        return {"log_spectral_norm": 1.0 + 0.3 * k}

    assert _rotate(AlarmPolicy(phase_transitions=False), layers, 2, together, 24) == []

    def one(name, k):  # only fc4 (analysed at snapshots 2, 6, 10, ...) drops, from snapshot 10 on
        return {"log_spectral_norm": 0.1 if name == "fc4" and k >= 10 else 1.0}

    got = _rotate(AlarmPolicy(phase_transitions=False), layers, 2, one, 24)
    assert got == [(100, SCALE_COLLAPSE, "fc4")]  # patience 1: at fc4's first analysis after the drop
    alarm = AlarmPolicy(phase_transitions=False)
    fired = [a for k in range(11) for a in _rotate_one(alarm, layers, k, one)]
    # over 1 analysis of each layer: fc6 and fc7 have 2 analyses so far (the common span)
    assert fired[0].extra["compared"] == [60, 100] and "since step 60" in fired[0].message


def _rotate_one(policy: AlarmPolicy, layers: list[str], k: int, values) -> list:
    names = [layers[(2 * k + i) % len(layers)] for i in range(2)]
    return policy.update([report(n, **values(n, k)) for n in names], 10 * k, kept=[n for n in layers if n not in names])


def test_policy_state_from_before_per_layer_history_still_loads():
    """A checkpoint written before (a list of snapshots) restores the same history."""
    policy = AlarmPolicy(phase_transitions=False)
    for s in range(4):
        policy.update([report("fc1"), report("fc2", num_traps=0), report("fc3")], s)
    old = policy.state_dict()
    old.pop("layer_history", None)
    old["snapshots"] = [
        Snapshot(
            s, {n: {"alpha": 3.0, "log_spectral_norm": 1.0, "num_traps": 0.0} for n in ("fc1", "fc2", "fc3")}
        ).to_dict()
        for s in range(4)
    ]
    restored = AlarmPolicy(phase_transitions=False)
    restored.load_state_dict(old)
    restored.update([report("fc1"), report("fc2", num_traps=4), report("fc3")], 4)
    fired = restored.update([report("fc1"), report("fc2", num_traps=4), report("fc3")], 5)
    assert [(a.layer, a.extra["compared"]) for a in fired if a.kind == NEW_TRAPS] == [("fc2", [2, 5])]


def test_without_a_rotation_the_per_layer_view_judges_exactly_the_snapshot_window_back():
    """Every layer in every snapshot (some failing): the per-layer history raises the same
    alarms, with the same numbers and steps, as the snapshots themselves."""
    import random

    from esdwatch.alarms import LayerHistory

    rng = random.Random(0)
    history, per_layer, compared = [], LayerHistory(4), 0
    for k in range(60):
        names = [f"fc{i}" for i in range(5)]
        reports = [
            report(
                n,
                alpha=rng.choice([1.7, 2.1, 2.6, 3.5, 7.0]),
                log_spectral_norm=rng.choice([0.2, 1.0, 1.1, 1.8]),
                num_traps=rng.choice([0, 0, 3]),
                status="failed" if rng.random() < 0.05 else "ok",
            )
            for n in names
        ]
        history = [*history, Snapshot.from_reports(reports, 10 * k)][-4:]
        per_layer.add(reports, 10 * k)
        analysed = {r.name for r in reports if r.status == "ok"}
        for rule in DEFAULT_HISTORY_RULES:
            old = [a.to_dict() for a in rule.check_history(history) if a.layer in analysed]
            new = [a.to_dict() for a in rule.check_history(per_layer.view(rule.window, 10 * k))]
            assert new == old, (k, rule.kind)
            compared += len(old)
    assert compared > 50  # the rules did fire on these histories


def test_replay_forgets_a_layer_missing_for_longer_than_a_rotation_can_leave_it_out():
    """A layer recorded once and then never again (removed) does not hold the history rules
    back for the rest of the run: after as many snapshots as there are layers it is gone."""
    records = [LayerRecord(0, 0, 0.0, report("tmp"))]
    for s in range(1, 12):
        norm = 0.1 if s >= 8 else 1.0  # fc2 drops at snapshot 8
        records += [LayerRecord(s, 0, 0.0, report(n, log_spectral_norm=norm if n == "fc2" else 1.0)) for n in LAYERS3]
    got = [(a.step, a.kind, a.layer) for a in replay(records, AlarmPolicy(phase_transitions=False))]
    assert got == [(8, SCALE_COLLAPSE, "fc2")]


LAYERS3 = ("fc1", "fc2", "fc3")
