"""Benchmark (issue 15): what ``layers_per_snapshot`` does to the overhead of a model with many layers.

Run: ``python experiments/bench_rotation.py`` (about 5 minutes on this 2-core CPU; ``--quick``
one round, ``--smoke`` seconds, for the test suite). Writes
``experiments/results/bench_rotation.md``.

A deep MLP (``--layers`` Linear(w, w) layers, default 32 x 384, ReLU between) is trained with
SGD on fixed random batches on one torch thread, for a fixed number of steps, in each
configuration: no monitor; ``every_n_steps="auto"`` without and with
``layers_per_snapshot="auto"``; ``every_n_steps=50`` without and with it, and with
``layers_per_snapshot=4``. The configurations alternate within each round (the order
rotates); the slowdown is the median over rounds of the ratio to the unmonitored run of the
same round. Because the machine has a second core, the worker's analysis partly runs beside
training rather than in its way, so the wall-clock slowdown understates what the analysis
costs: the *analysis share* (the worker's CPU seconds over the unmonitored run's training
seconds, what ``max_overhead`` budgets) is listed next to it. Also listed: snapshots taken
and skipped, layer analyses, the first snapshot's layers and the largest, the layers covered,
and the staleness at the end (steps since the oldest layer's latest record). ``at_end=False``:
the final snapshot would add the same cost to every monitored configuration.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from gpu_check import fmt, md_table  # noqa: E402

from esdwatch.monitor import Monitor  # noqa: E402
from esdwatch.rundir import read_records  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(layers=32, width=384, batch=32, steps=500, rounds=2),
    "quick": dict(layers=24, width=256, batch=32, steps=300, rounds=1),
    "smoke": dict(layers=6, width=64, batch=8, steps=60, rounds=1),
}

CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    '"auto"': dict(every_n_steps="auto"),
    '"auto", layers_per_snapshot="auto"': dict(every_n_steps="auto", layers_per_snapshot="auto"),
    "every_n_steps=50": dict(every_n_steps=50),
    'every_n_steps=50, layers_per_snapshot="auto"': dict(every_n_steps=50, layers_per_snapshot="auto"),
    "every_n_steps=50, layers_per_snapshot=4": dict(every_n_steps=50, layers_per_snapshot=4),
}


def deep_mlp(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        if i:
            mods.append(nn.ReLU())
        mods.append(nn.Linear(width, width))
    return nn.Sequential(*mods)


def run(cfg: dict[str, Any] | None, s: dict[str, Any], log_dir: str) -> dict[str, Any]:
    model = deep_mlp(s["layers"], s["width"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s["batch"], s["width"], generator=g) for _ in range(8)]
    mon = None
    if cfg is not None:
        mon = Monitor(model, log_dir=log_dir, at_end=False, verbose=False, drain_timeout=30.0, **cfg)
        mon.start()
    t0 = time.perf_counter()
    for step in range(1, s["steps"] + 1):
        loss = model(batches[step % 8]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step)
    out: dict[str, Any] = {"loop_s": time.perf_counter() - t0}
    if mon is None:
        return out
    t1 = time.perf_counter()
    mon.close()
    out["close_s"] = time.perf_counter() - t1
    by_step: dict[int, int] = {}
    latest: dict[str, int] = {}
    for r in read_records(Path(log_dir) / "esdwatch"):
        by_step[r.global_step] = by_step.get(r.global_step, 0) + 1
        latest[r.name] = max(latest.get(r.name, 0), r.global_step)
    st = mon.stats
    out.update(
        cpu_s=st["analysis_cpu_s"],
        snapshots=int(st["snapshots"]),
        skipped=int(st["skipped"]),
        analyses=int(st["layers_analysed"]),
        first=by_step[min(by_step)] if by_step else 0,
        largest=max(by_step.values(), default=0),
        covered=len(latest),
        stale=(s["steps"] - min(latest.values())) if len(latest) == s["layers"] else None,
        interval=mon.interval,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = common.parser(__doc__ or "")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    mode = common.mode_of(args)
    s = SETTINGS[mode]
    torch.set_num_threads(1)
    res = common.Results(
        "bench_rotation",
        args,
        "Experiment: rotating layers per snapshot on a model with many layers (issue 15)",
        common.command_line("bench_rotation.py", argv),
        provenance="Counts from the monitor's stats and records.jsonl.",
    )
    names = list(CONFIGS)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="esdwatch-rotation-") as tmp:
        run(None, dict(s, steps=min(20, s["steps"])), tmp)  # warm-up
        for rnd in range(s["rounds"]):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            got = {n: run(CONFIGS[n], s, f"{tmp}/r{rnd}c{names.index(n)}") for n in order}
            for n in names:
                runs[n].append(got[n])
                ratios[n].append(got[n]["loop_s"] / got["none"]["loop_s"])
                shares[n].append(got[n].get("cpu_s", 0.0) / got["none"]["loop_s"])
    res.add(
        "## Setup\n\n"
        f"Deep MLP: {s['layers']} x Linear({s['width']}, {s['width']}) ({s['layers']} analysed layers), batch "
        f"{s['batch']}, SGD, one torch thread, {s['steps']} steps per run, {s['rounds']} round(s); monitor "
        "defaults otherwise (thread worker, float64, MP fit, phases, trap test), max_overhead=0.05, at_end=False. "
        f"Unmonitored step: {statistics.median(r['loop_s'] for r in runs['none']) / s['steps'] * 1e3:.1f} ms."
    )
    rows = []
    for n in names:
        r = runs[n][-1]
        rows.append(
            [
                n,
                fmt(statistics.median(x["loop_s"] for x in runs[n])),
                fmt(statistics.median(ratios[n]), ".3f"),
                fmt(statistics.median(shares[n]), ".3f") if n != "none" else "-",
                fmt(r.get("close_s")),
                *(str(r.get(k, "-")) for k in ("snapshots", "skipped", "analyses", "first", "largest")),
                f"{r['covered']}/{s['layers']}" if "covered" in r else "-",
                fmt(r.get("stale"), "d") if "covered" in r else "-",
                str(r.get("interval", "-")),
            ]
        )
    head = [
        "configuration",
        "loop s",
        "slowdown",
        "analysis share",
        "close() s",
        "snapshots",
        "skipped",
        "layer analyses",
        "first snapshot layers",
        "largest snapshot",
        "covered",
        "staleness at end (steps)",
        "final interval",
    ]
    res.add("## Results\n\n" + md_table(head, rows))
    a, b = statistics.median(shares['"auto"']), statistics.median(shares['"auto", layers_per_snapshot="auto"'])
    c = statistics.median(shares["every_n_steps=50"])
    d = statistics.median(shares['every_n_steps=50, layers_per_snapshot="auto"'])
    res.add(
        "## Verdict\n\n"
        f'Analysis share of the training time, budget 0.05: `"auto"` {a:.3f} without rotation, {b:.3f} with '
        f'`layers_per_snapshot="auto"`; `every_n_steps=50` {c:.3f} without, {d:.3f} with. Wall-clock slowdowns '
        "are in the table (on a shared 2-core machine the worker partly runs beside training, and the load of "
        "other processes moves them by several percent)."
    )
    res.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
