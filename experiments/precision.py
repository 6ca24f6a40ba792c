"""Precision by measurement (issue 15): which metric needs the float64 Gram product?

Run: ``python experiments/precision.py``; ``--smoke`` runs small shapes in seconds
(tests/test_experiments_smoke.py). Writes ``experiments/results/precision.md``.

Every metric of esdwatch's record is computed twice on the same float32 weights, by the
float64 Gram route (``method="gram"``: W cast to float64, ``dsyrk``, float64 ``eigvalsh``)
and by the mixed route (``method="mixed"``: ``ssyrk`` on the float32 weights, the Gram cast
to float64, float64 ``eigvalsh``), the trap test on. Per metric: the largest absolute and
relative difference over every layer, and whether the discrete outcomes (x_min and n_tail,
phase, trap count, numerical rank) are equal. Inputs: every phase of
``esdwatch.engine.synthetic`` (3 seeds, two shapes), all-MiniLM-L6-v2's 39 matrices, and
Llama-7B-shaped heavy-tailed matrices (4096 x 4096, 11008 x 4096, 32000 x 4096), these also
timed side by side (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_scale import bench_parser, minilm, parse_bench_args, timed, write_result  # same directory

from esdwatch.engine.analyzer import analyze, analyze_matrix
from esdwatch.engine.synthetic import GENERATORS, heavy_tailed, make_phase_matrix
from esdwatch.engine.tail import AUTO_MIXED_MIN_Q
from esdwatch.schema import LayerReport

NAME = "precision"

#: Fields compared as numbers (every float field of the record that the default analysis fills).
FLOAT_FIELDS = [
    f.name
    for f in dataclasses.fields(LayerReport)
    if f.type == "float"
    and not f.name.startswith(("tpl_", "fit_", "alpha_ci"))
    and f.name not in ("Q", "phase_confidence")
]
#: Outcomes that must be equal, not close.
DISCRETE = ("n_tail", "phase", "num_traps", "numerical_rank", "num_spikes")


def compare_reports(pairs: Iterable[tuple[LayerReport, LayerReport]]) -> dict[str, Any]:
    """Largest |difference| (absolute, relative) per float field, equality counts per discrete
    one, and how many spectra the mixed route's guard recomputed in float64 (identical ones)."""
    err: dict[str, list[float]] = {name: [0.0, 0.0] for name in FLOAT_FIELDS}
    same: dict[str, list[int]] = {name: [0, 0] for name in DISCRETE}
    guarded = [0, 0]
    for ref, rep in pairs:
        guarded[0] += bool(np.array_equal(ref.evals, rep.evals))
        guarded[1] += 1
        for name in FLOAT_FIELDS:
            a, b = float(getattr(ref, name)), float(getattr(rep, name))
            if not (math.isfinite(a) and math.isfinite(b)):
                if math.isfinite(a) != math.isfinite(b):
                    err[name] = [math.inf, math.inf]
                continue
            err[name][0] = max(err[name][0], abs(a - b))
            err[name][1] = max(err[name][1], abs(a - b) / abs(a) if a else (0.0 if a == b else math.inf))
        for name in DISCRETE:
            same[name][0] += getattr(ref, name) == getattr(rep, name)
            same[name][1] += 1
    return {"err": err, "same": same, "guarded": guarded}


Pairs = list[tuple[LayerReport, LayerReport]]


def both(W: torch.Tensor) -> tuple[LayerReport, LayerReport]:
    return analyze_matrix(W, method="gram", keep_evals=True), analyze_matrix(W, method="mixed", keep_evals=True)


def synthetic(smoke: bool) -> Pairs:
    shapes = [(800, 400)] if smoke else [(4000, 1000), (1000, 500), (2400, 2048)]
    pairs = []
    for n, m in shapes:
        for phase in GENERATORS:
            for seed in range(1 if smoke else 3):
                pairs.append(both(make_phase_matrix(phase, n, m, seed=seed).to(torch.float32)))
    print(f"synthetic: {len(pairs)} matrices", flush=True)
    return pairs


def minilm_pairs() -> Pairs:
    ref, rep = (analyze(minilm(), method=m, keep_evals=True) for m in ("gram", "mixed"))
    print(f"MiniLM: {len(ref.layers)} matrices", flush=True)
    return list(zip(ref.layers, rep.layers))


def llama(smoke: bool, repeats: int) -> tuple[Pairs, list[dict[str, Any]]]:
    shapes = [(800, 400)] if smoke else [(4096, 4096), (11008, 4096), (32000, 4096)]
    pairs, rows = [], []
    for n, m in shapes:
        W = heavy_tailed(n, m, seed=1, mu=2.2, dtype=torch.float32)
        t64, ref = timed(lambda W=W: analyze_matrix(W, method="gram", keep_evals=True), repeats)
        t32, rep = timed(lambda W=W: analyze_matrix(W, method="mixed", keep_evals=True), repeats)
        pairs.append((ref, rep))
        a = W.numpy()
        g64, _ = timed(lambda a=a: a.astype(np.float64).T @ a.astype(np.float64), repeats)
        g32, _ = timed(lambda a=a: a.T @ a, repeats)
        rows.append({"shape": f"{n}x{m}", "t64": t64, "t32": t32, "g64": g64, "g32": g32, "alpha": ref.alpha})
        print(f"{n}x{m}: gram {t64:.2f}s mixed {t32:.2f}s", flush=True)
    return pairs, rows


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else "0" if x == 0 else f"{x:.1e}"


def write(args: argparse.Namespace, results: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> Path:
    mode = "smoke" if args.smoke else "full"
    L = [f"# Experiment: {NAME} (issue 15)", ""]
    L += [
        f"mode: **{mode}**; repeats: {args.repeats} (median); torch threads: {torch.get_num_threads()}; "
        f"load average at start: {args.load:.2f}; torch {torch.__version__}",
        "",
        "## Setup",
        "",
        f"`python experiments/{NAME}.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        'float64 Gram route (`method="gram"`) against the mixed route (`method="mixed"`: float32',
        "product, float64 eigenvalues) on the same float32 weights, trap test on.",
        "",
    ]
    if args.smoke:
        L += ["This is a smoke run: tiny shapes, no figure here is a measurement.", ""]
    L += ["## Largest difference per metric", ""]
    cols = list(results)
    L += ["| metric | " + " | ".join(f"{c}: abs / rel" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in FLOAT_FIELDS:
        cells = [f"{_g(results[c]['err'][name][0])} / {_g(results[c]['err'][name][1])}" for c in cols]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += ["", "## Discrete outcomes equal", ""]
    L += ["| outcome | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in DISCRETE:
        L.append(f"| {name} | " + " | ".join("{}/{}".format(*results[c]["same"][name]) for c in cols) + " |")
    L.append(
        "| recomputed in float64 by the guard | "
        + " | ".join("{}/{}".format(*results[c]["guarded"]) for c in cols)
        + " |"
    )
    L += ["", "## Time, same matrix side by side", ""]
    L += ["| shape | alpha | Gram float64 s | Gram float32 s | analyze gram s | analyze mixed s | speed-up |"]
    L += ["|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(
            f"| {r['shape']} | {r['alpha']:.3f} | {r['g64']:.2f} | {r['g32']:.2f} | {r['t64']:.2f} | "
            f"{r['t32']:.2f} | {r['t64'] / r['t32']:.2f}x |"
        )
    L += ["", "## Verdict", "", args.verdict or "(see the tables)", ""]
    return write_result(Path(args.out), NAME, L)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--no-minilm", dest="minilm", action="store_false")
    args = parse_bench_args(parser, argv)
    if args.smoke:
        args.minilm = False
    groups = {"synthetic phases": synthetic(args.smoke)}
    if args.minilm:
        groups["all-MiniLM-L6-v2"] = minilm_pairs()
    groups["Llama-7B shapes"], rows = llama(args.smoke, args.repeats)
    # the matrices spectrum="auto" decomposes by the mixed route
    groups["all, N >= 2M"] = [p for ps in list(groups.values()) for p in ps if p[0].N >= AUTO_MIXED_MIN_Q * p[0].M]
    results = {label: compare_reports(pairs) for label, pairs in groups.items()}
    path = write(args, results, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
