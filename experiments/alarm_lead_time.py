"""Experiment: do the default alarms come before the damage, and stay quiet on healthy runs? (issue 16)

Three runs that go wrong in a known way at step S, each next to the same run left healthy
(the twin), with :class:`esdwatch.monitor.Monitor` attached at its defaults
(``every_n_steps`` and ``log_dir`` only): the README demo's MLP (64-256-256-128-10, SGD
with momentum) on scikit-learn's digits.

1. rank collapse: from S a growing group-lasso penalty on fc2's rows kills its units;
2. learning-rate spike: from S the learning rate grows geometrically (a schedule bug);
3. scale collapse: from S fc2's weights grow by a constant factor each step while the
   other layers barely move (shrinking instead was measured too: flagged, but the network
   compensates and the accuracy stays within the margin, so there is no damage to lead).

The healthy twin is run with several seeds, and the README demo (``python -m esdwatch.demo``)
is replayed too: false alarms are counted on all of them.

Plus, when ``--anti-grokking DIR`` names a finished run of ``alarm_runs.py anti_grokking``
(Prakash & Martin 2025: depth-3 width-200 MLP, 1,000 samples, init x8, no weight decay,
trained far past grokking; about 30 min on one core), its recorded history.

The alarms are the default policy replayed on each run's recorded history
(:func:`esdwatch.alarms.replay` on ``records.jsonl``; the same policy the monitor ran live,
whose own ``alarms.jsonl`` is checked to agree), so a rule can be re-tuned without training again.
Damage: the test accuracy, as a running mean of 3 evaluations, ``MARGIN`` below its level
just before S (or, for anti-grokking, below its best so far).

    python experiments/alarm_lead_time.py                       # ~3 min on 2 shared CPU cores
    python experiments/alarm_lead_time.py --anti-grokking /tmp/ag  # + the long run's history
    python experiments/alarm_lead_time.py --smoke               # seconds (the test suite)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alarm_runs as R  # noqa: E402
import common as C  # noqa: E402
import numpy as np  # noqa: E402

from esdwatch.alarms import replay  # noqa: E402
from esdwatch.rundir import read_alarms, read_records  # noqa: E402

NAME = "alarm_lead_time"
#: test-accuracy drop that counts as damage
MARGIN = 0.05
WARN = ("warning", "error")


def settings(mode: str) -> dict[str, Any]:
    if mode == "smoke":
        return dict(steps=160, every=20, start=60, rank_rate=2e-4, lr_growth=1.03, scale=1.05, twins=1, demo=False)
    return dict(steps=1500, every=25, start=400, rank_rate=1e-4, lr_growth=1.005, scale=1.01, twins=3, demo=True)


def scenarios(cfg: dict[str, Any]) -> dict[str, tuple[R.Event | None, str]]:
    s = cfg["start"]
    return {
        "healthy": (None, "no event (the twin)"),
        "rank_collapse": (
            R.rank_collapse_event(s, "fc2", cfg["rank_rate"]),
            f"from step {s}, a group-lasso penalty on fc2's units growing by {cfg['rank_rate']:g} a step",
        ),
        "lr_spike": (
            R.lr_spike_event(s, cfg["lr_growth"]),
            f"from step {s}, the learning rate x{cfg['lr_growth']:g} a step (up to x50)",
        ),
        "scale_collapse": (
            R.scale_collapse_event(s, "fc2", cfg["scale"]),
            f"from step {s}, fc2's weights x{cfg['scale']:g} a step",
        ),
    }


# ---------------------------------------------------------------------- measurements


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def damage_step(metrics: list[dict[str, Any]], start: int | None) -> int | None:
    """First step whose 3-evaluation running mean of test accuracy is MARGIN below the reference.

    Reference: the mean over the evaluations in the 100 steps up to ``start``; with
    ``start=None`` the best running mean so far (a collapse after a peak). A non-finite
    loss is damage at once.
    """
    steps = np.array([m["step"] for m in metrics])
    acc = np.array([m["test_acc"] for m in metrics], dtype=float)
    run = np.convolve(acc, np.ones(3) / 3, mode="full")[: len(acc)]
    run[:2] = acc[:2]
    if start is not None:
        ref_mask = (steps > start - 100) & (steps <= start)
        ref = float(acc[ref_mask].mean()) if ref_mask.any() else float(acc[steps <= start][-1])
    best = -1.0
    for i, (step, value) in enumerate(zip(steps, run)):
        if metrics[i].get("loss") is None and (start is None or step > start):
            return int(step)
        if start is None:
            best = max(best, float(value))
            if value <= best - MARGIN:
                return int(step)
        elif step > start and value <= ref - MARGIN:
            return int(step)
    return None


def first_alarms(alarms: Sequence[Any], after: int = -1) -> dict[str, Any]:
    """kind -> the first warning-or-error alarm of that kind fired after step ``after``."""
    out: dict[str, Any] = {}
    for a in sorted(alarms, key=lambda a: a.step):
        if a.severity in WARN and a.step > after and a.kind not in out:
            out[a.kind] = a
    return out


def count_by_kind(alarms: Sequence[Any], severities: Sequence[str] = WARN) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in alarms:
        if a.severity in severities:
            out[a.kind] = out.get(a.kind, 0) + 1
    return out


def analyse_run(run: Path) -> dict[str, Any]:
    records = read_records(run)
    alarms = replay(records)
    live = [a for a in read_alarms(run)]
    return {
        "records": records,
        "alarms": alarms,
        "live_agrees": sorted((a.step, a.kind, a.layer) for a in live)
        == sorted((a.step, a.kind, a.layer) for a in alarms),
        "metrics": read_metrics(run),
    }


# ---------------------------------------------------------------------- figures


def series(records: Sequence[Any], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        xs, ys = out.setdefault(r.report.name, ([], []))
        xs.append(r.global_step)
        ys.append(float(getattr(r.report, metric)))
    return out


def figure(run: dict[str, Any], twin: dict[str, Any] | None, title: str, start: int | None, damage: int | None):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7.0), sharex=True)
    m = run["metrics"]
    axes[0].plot([x["step"] for x in m], [x["test_acc"] for x in m], label="test accuracy", color="C0")
    axes[0].plot([x["step"] for x in m], [x["train_acc"] for x in m], label="train accuracy", color="C0", alpha=0.4)
    if twin is not None:
        t = twin["metrics"]
        axes[0].plot(
            [x["step"] for x in t], [x["test_acc"] for x in t], "--", color="gray", label="healthy twin (test)"
        )
    axes[0].set_ylabel("accuracy")
    for ax, metric, label in ((axes[1], "alpha", "alpha"), (axes[2], "log_spectral_norm", "log10 lambda_max")):
        for i, (name, (xs, ys)) in enumerate(series(run["records"], metric).items()):
            ax.plot(xs, ys, marker=".", ms=3, color=f"C{i + 1}", label=name)
        ax.set_ylabel(label)
    axes[1].axhline(2.0, color="k", lw=0.6, ls=":")
    first = first_alarms(run["alarms"])
    for ax in axes:
        if start is not None:
            ax.axvline(start, color="k", lw=1, ls="--")
        if damage is not None:
            ax.axvline(damage, color="red", lw=1.5)
        for a in first.values():
            ax.axvline(a.step, color="orange", lw=1, alpha=0.8)
    for kind, a in first.items():
        axes[0].annotate(kind, (a.step, 0.02), rotation=90, fontsize=7, color="darkorange", va="bottom")
    axes[0].set_title(f"{title}\nevent (dashed), first warning of each alarm kind (orange), damage (red)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- the table


def rows_for(name: str, run: dict[str, Any], twin: dict[str, Any], start: int, every: int) -> list[list[Any]]:
    damage = damage_step(run["metrics"], start)
    fired = first_alarms(run["alarms"], after=start)
    false = count_by_kind(twin["alarms"])
    rows = []
    for kind, a in sorted(fired.items(), key=lambda kv: kv[1].step):
        lead = None if damage is None else damage - a.step
        rows.append(
            [
                name,
                kind,
                a.layer,
                a.step,
                damage if damage is not None else "none in run",
                "-" if lead is None else f"{lead} ({lead / every:+.0f})",
                false.get(kind, 0),
            ]
        )
    if not rows:
        rows.append([name, "(none)", "-", "-", damage if damage is not None else "none in run", "-", 0])
    info = [a for a in run["alarms"] if a.severity == "info" and a.step > start and a.kind != "phase_transition"]
    if info:  # the earliest informational alarm, for comparison (not counted as a warning)
        a = min(info, key=lambda a: a.step)
        lead = None if damage is None else damage - a.step
        rows.append(
            [
                name,
                f"({a.kind}, info)",
                a.layer,
                a.step,
                damage if damage is not None else "none in run",
                "-" if lead is None else f"{lead} ({lead / every:+.0f})",
                count_by_kind(twin["alarms"], ("info",)).get(a.kind, 0),
            ]
        )
    return rows


def anti_grokking_part(res: C.Results, ag_dir: Path) -> list[str]:
    run = analyse_run(ag_dir)
    m = run["metrics"]
    best = max(m, key=lambda x: x["test_acc"])
    damage = damage_step(m, None)
    fired = first_alarms(run["alarms"])
    every = sorted({r.global_step for r in run["records"]})
    every_n = every[1] - every[0] if len(every) > 1 else 1
    rows = []
    for kind, a in sorted(fired.items(), key=lambda kv: kv[1].step):
        lead = None if damage is None else damage - a.step
        rows.append([kind, a.layer, a.step, "-" if lead is None else f"{lead} ({lead / every_n:+.0f})", a.message])
    res.add(
        f"## Anti-grokking (Prakash & Martin 2025)\n\n"
        f"`{ag_dir}`: {m[-1]['step']} steps; train accuracy at the end {m[-1]['train_acc']:.3f}; test accuracy "
        f"best {best['test_acc']:.3f} at step {best['step']}, last {m[-1]['test_acc']:.3f}; damage (test accuracy "
        f"{MARGIN:g} below its best running mean): **{damage if damage is not None else 'none in the run'}**. "
        f"Snapshots every {every_n} steps. "
        + (
            "The live monitor's alarms agree with the replay."
            if run["live_agrees"]
            else "This run was started (and its `alarms.jsonl` written) with an earlier version of the rules; "
            "the alarms below are the final defaults replayed on its records."
        )
    )
    res.add(
        C.md_table(["alarm kind", "layer", "first fired at", "lead time (steps, snapshots)", "why"], rows)
        if rows
        else "No warning-level alarm fired."
    )
    per_layer = []
    for name, (xs, alphas) in series(run["records"], "alpha").items():
        traps = series(run["records"], "num_traps")[name][1]
        below = [x for x, a in zip(xs, alphas) if a < 2]
        with_traps = [x for x, t in zip(xs, traps) if t > 0]
        per_layer.append(
            [
                name,
                C.fmt(alphas[0]),
                C.fmt(min(alphas)),
                C.fmt(alphas[-1]),
                below[0] if below else "never",
                f"{int(max(traps))} (first at {with_traps[0]})" if with_traps else "0",
            ]
        )
    res.add(
        "Per layer, over the run (the papers' signals: alpha < 2 and correlation traps before the collapse):\n\n"
        + C.md_table(["layer", "alpha at start", "min alpha", "last alpha", "first alpha < 2", "max traps"], per_layer)
        + f"\n\nAlarms of any severity by kind: {_kinds(count_by_kind(run['alarms'], ('info', 'warning', 'error')))}."
    )
    res.figure(figure(run, None, "anti-grokking run", None, damage), "anti_grokking", "The anti-grokking run")
    return [str(damage), str({k: a.step for k, a in fired.items()}), ag_verdict(m, damage, fired)]


def ag_verdict(m: list[dict[str, Any]], damage: int | None, fired: dict[str, Any]) -> str:
    if damage is None:
        return (
            f"no collapse within {m[-1]['step']} steps (test accuracy still {m[-1]['test_acc']:.3f}, train "
            f"{m[-1]['train_acc']:.3f}), so there is no lead time to measure: the papers' collapse was not "
            "reproduced at this budget on digits. "
            + (
                f"Warning-level alarms fired nonetheless: {', '.join(fired)} (false alarms on this run so far)."
                if fired
                else "No warning-level alarm fired on this long run (no false alarm either)."
            )
        )
    early = [k for k, a in fired.items() if a.step < damage]
    return f"collapse at step {damage}; warnings before it: {', '.join(early) or 'none'}."


def main(argv: Sequence[str] | None = None) -> int:
    ap = C.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--anti-grokking", default=None, help="a finished `alarm_runs.py anti_grokking` run directory")
    args = ap.parse_args(argv)
    mode = C.mode_of(args)
    cfg = settings(mode)
    C.setup_torch(args)
    res = C.Results(
        NAME,
        args,
        "Experiment: alarm lead time before the damage, and false alarms on healthy runs",
        C.command_line("alarm_lead_time.py", argv),
        provenance=(
            "Every alarm below is the monitor's default policy replayed on the run's recorded `records.jsonl` "
            "(`esdwatch.alarms.replay`), checked against the live monitor's own `alarms.jsonl`."
        ),
    )
    logs = C.LogRoot(args.log_dir, NAME)
    try:
        runs: dict[str, dict[str, Any]] = {}
        descriptions = {}
        for name, (event, text) in scenarios(cfg).items():
            descriptions[name] = text
            rc = R.base(name, cfg["steps"], cfg["every"], seed=args.seed)
            rc.eval_every = cfg["every"]
            R.train(rc, logs.sub(name), event)
            runs[name] = analyse_run(logs.root / name)
        for seed in range(1, cfg["twins"]):
            rc = R.base("healthy", cfg["steps"], cfg["every"], seed=args.seed + seed)
            rc.eval_every = cfg["every"]
            R.train(rc, logs.sub(f"healthy_seed{seed}"))
            runs[f"healthy_seed{seed}"] = analyse_run(logs.root / f"healthy_seed{seed}")
        demo_recs = demo_records(logs.sub("demo")) if cfg["demo"] else None
        demo = replay(demo_recs) if demo_recs is not None else None
        res.add(
            "## Setup\n\n"
            f"MLP {R.BASE['sizes']} on digits (1,348 train / 449 test), SGD lr {R.BASE['lr']} momentum 0.9, "
            f"batch {R.BASE['batch']}, {cfg['steps']} steps; `Monitor(every_n_steps={cfg['every']}, at_start=True)` "
            "otherwise at its defaults (traps on, default rules, patience 2). Analysed: fc1, fc2, fc3 (fc4, 10 "
            "outputs, is below the 50-eigenvalue floor). Events:\n\n"
            + "\n".join(f"* **{k}**: {v}" for k, v in descriptions.items())
            + f"\n\nDamage: the 3-evaluation running mean of test accuracy {MARGIN:g} below its mean over the "
            f"100 steps before step {cfg['start']} (evaluated every {cfg['every']} steps)."
        )
        table = []
        for name in ("rank_collapse", "lr_spike", "scale_collapse"):
            table += rows_for(name, runs[name], runs["healthy"], cfg["start"], cfg["every"])
        res.add(
            "## Lead time\n\nLead time = damage step - first-fired step (positive: the alarm came first); in "
            f"brackets the same in snapshots (every {cfg['every']} steps). Warning- and error-level alarms only. "
            "False alarms: the warning-level alarms of the same kind on the healthy twin (whole run).\n\n"
            + C.md_table(
                [
                    "failure",
                    "alarm kind",
                    "layer",
                    "fired at",
                    "damage at",
                    "lead time (steps, snapshots)",
                    "false alarms on the healthy twin",
                ],
                table,
            )
        )
        finals = ", ".join(
            f"{n} {runs[n]['metrics'][-1]['test_acc']:.3f} (lowest after step {cfg['start']}: "
            f"{min(x['test_acc'] for x in runs[n]['metrics'] if x['step'] > cfg['start']):.3f})"
            for n in ("healthy", "rank_collapse", "lr_spike", "scale_collapse")
        )
        res.add(f"Final test accuracy: {finals}.")
        healthy = [n for n in runs if n.startswith("healthy")]
        twin_rows = []
        twin_warn: dict[str, int] = {}
        for n in healthy:
            warn = count_by_kind(runs[n]["alarms"])
            for k, v in warn.items():
                twin_warn[k] = twin_warn.get(k, 0) + v
            info = count_by_kind(runs[n]["alarms"], ("info",))
            twin_rows.append(
                [n, f"{runs[n]['metrics'][-1]['test_acc']:.3f}", sum(warn.values()), _kinds(warn), _kinds(info)]
            )
        if demo is not None:
            warn, info = count_by_kind(demo), count_by_kind(demo, ("info",))
            twin_rows.append(
                ["README demo (`python -m esdwatch.demo`)", "-", sum(warn.values()), _kinds(warn), _kinds(info)]
            )
            for k, v in warn.items():
                twin_warn[k] = twin_warn.get(k, 0) + v
        agree = all(r["live_agrees"] for r in runs.values())
        res.add(
            "## Healthy runs: false alarms\n\n"
            + C.md_table(["run", "final test acc", "warning-level alarms", "by kind", "informational"], twin_rows)
            + f"\n\nLive alarms (`alarms.jsonl`) agree with the replay in every run: **{agree}**."
        )
        for name in ("rank_collapse", "lr_spike", "scale_collapse"):
            run = runs[name]
            res.figure(
                figure(run, runs["healthy"], name, cfg["start"], damage_step(run["metrics"], cfg["start"])),
                name,
                f"{name}: {descriptions[name]}",
            )
        ag = None
        if args.anti_grokking:
            ag = anti_grokking_part(res, Path(args.anti_grokking))
        healthy_recs = {n: runs[n]["records"] for n in healthy}
        if demo_recs is not None:
            healthy_recs["demo"] = demo_recs
        if args.anti_grokking:
            healthy_recs["anti_grokking"] = read_records(Path(args.anti_grokking))
        failing = {n: runs[n]["records"] for n in ("rank_collapse", "lr_spike", "scale_collapse")}
        res.add(ablation(healthy_recs, failing))
        rotation_md, rotation_note = rotation_part(runs, healthy_recs, cfg["start"], cfg["every"])
        res.add(rotation_md)

        res.add("## Verdict\n\n" + verdict(table, twin_warn, ag) + "\n" + rotation_note)
        res.add(CAVEATS)
        res.write()
    finally:
        logs.close()
    return 0


def ablation(healthy: dict[str, Any], failing: dict[str, Any]) -> str:
    """Each default set against the alternative it was chosen over, replayed on the same recorded runs."""
    from dataclasses import replace

    from esdwatch.alarms import (
        DEFAULT_RULES,
        AlarmPolicy,
        AlphaCrossingRule,
        CorrelationFlowRule,
        NewTrapsRule,
        ScaleJumpRule,
    )

    hist = [ScaleJumpRule(), AlphaCrossingRule(), NewTrapsRule(), CorrelationFlowRule()]
    loud = [replace(r, severity="warning") if r.kind in ("alpha_low", "correlation_trap") else r for r in DEFAULT_RULES]
    variants: dict[str, dict[str, Any]] = {
        "the defaults": {},
        "alpha_low, correlation_trap at warning (before)": dict(rules=[*loud, *hist]),
        "alpha_crossing min_drop 0.3 (not 0.15)": dict(
            rules=[*DEFAULT_RULES, hist[0], AlphaCrossingRule(min_drop=0.3), *hist[2:]]
        ),
        "new_traps min_traps 1 (not 2)": dict(rules=[*DEFAULT_RULES, *hist[:2], NewTrapsRule(min_traps=1), hist[3]]),
        "scale_collapse patience 2 (not 1)": dict(patience={"scale_collapse": 2}),
        "correlation_flow patience 1 (not 2)": dict(patience={"correlation_flow": 1}),
        "correlation_flow min_layers 2 (not 3)": dict(
            rules=[*DEFAULT_RULES, *hist[:3], CorrelationFlowRule(min_layers=2)]
        ),
    }
    rows = []
    for label, kw in variants.items():
        false = []
        for name, recs in healthy.items():
            n = sum(a.severity in WARN for a in replay(recs, AlarmPolicy(**kw)))
            if n:
                false.append(f"{name} {n}")
        firsts = []
        for recs in failing.values():
            warn = [a for a in replay(recs, AlarmPolicy(**kw)) if a.severity in WARN]
            a = min(warn, key=lambda a: a.step) if warn else None
            firsts.append(f"{a.step} `{a.kind}`" if a else "-")
        rows.append([label, ", ".join(false) or "0", *firsts])
    return (
        "## Rules tuned on these runs\n\nEach default against the alternative it was chosen over, replayed on the "
        "same recorded runs (no new training): warning-level alarms on the healthy runs, and the step of the first "
        "warning in each failure.\n\n"
        + C.md_table(["rules", "false alarms (healthy runs)", *(f"first warning: {n}" for n in failing)], rows)
    )


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def demo_records(out: Path) -> list[Any]:
    """The README demo's records (a healthy run, validation accuracy ~0.95)."""
    import contextlib
    import io

    from esdwatch import demo

    with contextlib.redirect_stdout(io.StringIO()):
        demo.main(["--out", str(out)])
    run_dir = next(p.parent.parent for p in out.rglob("records.jsonl"))
    return read_records(run_dir)


CAVEATS = """## Caveats

* One seed per failure; three for the healthy twin. Lead times in snapshots depend on the
  interval (25 steps here): the history rules compare with the snapshot 3 back, so a
  sparser schedule sees larger changes per comparison; under a layer rotation, with the
  layer's own analysis 3 back, so each layer is as under a sparser schedule.
* The rank-collapse damage is mild: with most of fc2's units dead the net keeps about
  0.95 test accuracy (twin 0.97); the damage step is the first dip that crosses the margin.
* The learning-rate ramp gives almost no warning: every layer's scale grows together (so
  `scale_collapse`, which compares layers, stays quiet until one layer runs away) and the
  traps appear after the accuracy has dropped; `alpha_crossing` fires one snapshot ahead.
* Anti-grokking: `python experiments/alarm_runs.py anti_grokking --steps 600000 --every 3000
  --eval-every 1000` (77 min on the shared CPU), recorded before the rules here were final;
  the alarms above are the final defaults replayed on its records. Only fc1 (64
  eigenvalues, so a noisy tail fit) and fc2 are analysed; fc3 (10 x 200) is below the
  50-eigenvalue floor. Digits, not MNIST; 6 x 10^5 steps may be far too few for the
  collapse the papers report."""


def rotated(records: Sequence[Any], per: int) -> list[Any]:
    """The records a ``layers_per_snapshot=per`` rotation would have written: the same analyses, round-robin.

    A rotation copies and analyses the same weights at the same steps, only fewer layers per
    snapshot (here the fixed round-robin that the monitor's staleness order gives with an
    int), so its records are a subset of the full run's.
    """
    by_step: dict[int, list[Any]] = {}
    for r in records:
        by_step.setdefault(int(r.global_step), []).append(r)
    names = list(dict.fromkeys(r.name for r in records))
    out: list[Any] = []
    for k, step in enumerate(sorted(by_step)):
        take = {names[(k * per + i) % len(names)] for i in range(per)}
        out += [r for r in by_step[step] if r.name in take]
    return out


def sparser(records: Sequence[Any], every: int) -> list[Any]:
    """The records of the same run snapshotted ``every`` times less often (every layer, every ``every``-th snapshot)."""
    steps = sorted({int(r.global_step) for r in records})
    keep = set(steps[::every])
    return [r for r in records if int(r.global_step) in keep]


def rotation_part(
    runs: dict[str, dict[str, Any]], healthy: dict[str, list[Any]], start: int, every: int, per: int = 1
) -> tuple[str, str]:
    """First warning and lead time per failure, and false alarms on the healthy runs: every layer at
    every snapshot, a rotation of ``per`` layers per snapshot, and every layer at a 3x sparser schedule."""
    period = 3 // per

    def variants(records: Sequence[Any]) -> list[list[Any]]:
        return [list(records), rotated(records, per), sparser(records, period)]

    rows, gaps = [], []
    for name in ("rank_collapse", "lr_spike", "scale_collapse"):
        run = runs[name]
        damage = damage_step(run["metrics"], start)
        cells = [name, damage if damage is not None else "none in run"]
        firsts = []
        for records in variants(run["records"]):
            fired = first_alarms(replay(records), after=start)
            if not fired:
                cells.append("(none)")
                continue
            first = min(fired.values(), key=lambda a: a.step)
            firsts.append(first.step)
            lead = "" if damage is None else f", lead {damage - first.step}"
            cells.append(f"`{first.kind}` {first.layer} at {first.step}{lead}")
        rows.append(cells)
        if len(firsts) == 3:
            gaps.append((firsts[1] - firsts[0]) // every)
    false_rows, extra = [], {}
    for n, recs in healthy.items():
        counts = [count_by_kind(replay(records)) for records in variants(recs)]
        false_rows.append([n, *(f"{sum(c.values())} ({_kinds(c)})" if c else "0" for c in counts)])
        extra[n] = (sum(counts[1].values()), sum(counts[2].values()))
    heads = [
        "every layer, every snapshot",
        f"{per} layer per snapshot (rotation)",
        f"every layer, 1 snapshot in {period}",
    ]
    text = (
        f"## Under a layer rotation (`layers_per_snapshot={per}`)\n\n"
        f"The same runs with {per} of the 3 layers per snapshot, round-robin (each layer analysed every "
        f"{period * every} steps instead of {every}): the records a rotation writes are a subset of the "
        "full run's, replayed with the same default policy, whose history rules compare each layer with its "
        f"own analysis 3 analyses back. For comparison, every layer at a {period}x sparser schedule (every "
        f"{period * every} steps).\n\n"
        + C.md_table(["failure", "damage at", *(f"first warning, {h}" for h in heads)], rows)
        + "\n\nWarning-level alarms on the healthy runs:\n\n"
        + C.md_table(["run", *heads], false_rows)
    )
    note = (
        f"* **Under a layer rotation** ({per} of 3 layers per snapshot): first warnings "
        f"{', '.join(f'{g:+d}' for g in gaps)} snapshots from every layer at every snapshot; warning-level alarms "
        f"on the healthy runs {sum(r for r, _ in extra.values())} (every layer, 1 snapshot in {period}: "
        f"{sum(x for _, x in extra.values())}): each layer of a rotation is as under a sparser schedule."
    )
    return text, note


def verdict(table: list[list[Any]], twin_warn: dict[str, int], ag: list[str] | None) -> str:
    """One line per failure (its first warning and lead), the false alarms, the anti-grokking run."""
    lines = []
    for failure in dict.fromkeys(r[0] for r in table):
        warn = [r for r in table if r[0] == failure and not str(r[1]).startswith("(")]
        fired = [r for r in warn if r[3] != "-"]
        if not fired:
            lines.append(f"* **{failure}**: no warning-level alarm.")
            continue
        first = min(fired, key=lambda r: r[3])
        before = [r[1] for r in fired if r[5] != "-" and int(str(r[5]).split()[0]) > 0]
        lead = first[5] if first[5] != "-" else "no damage in the run to lead"
        lines.append(
            f"* **{failure}**: first warning `{first[1]}` on {first[2]} at step {first[3]}, damage at {first[4]}: "
            f"lead {lead}; kinds before the damage: {', '.join(f'`{k}`' for k in before) or 'none'}."
        )
    lines.append(
        f"* **False alarms**: {sum(twin_warn.values())} warning-level alarms on the healthy runs "
        "(the twins and the README demo)."
    )
    if ag is not None:
        lines.append(f"* **Anti-grokking**: {ag[2]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
