"""GPU check (issue 15): the engine on Llama-7B shapes, the monitor's slowdown of a >= 50M-parameter model, FSDP.

Run on a CUDA machine: ``python experiments/gpu_check.py`` (under 8 minutes on one H100;
``--budget-s`` trims the repetitions to fit). Writes ``experiments/results/gpu_check.md``.
Without CUDA (or with ``--cpu``) it runs the CPU fallback (shapes and model scaled down,
FSDP left out: Lightning's ``"fsdp"`` strategy refuses CPU) and writes
``gpu_check_cpu.md``; ``--smoke`` is the smallest CPU version, for the test suite (about
10 s), written to a temporary directory unless ``--out`` says otherwise.

Three parts, each measured side by side in one run:

1. **Engine on Llama-7B shapes** (4096x4096, 11008x4096, 4096x11008, 32000x4096; the CPU
   fallback divides each side by 8): heavy-tailed matrices (i.i.d. Pareto entries, mu=2: fitted alpha about 2.7) from
   :func:`esdwatch.engine.synthetic.heavy_tailed`, float32 on the device, analysed by
   ``esdwatch.analyze_matrix`` on the device: the exact path (float64 eigenvalues, the trap
   test included: the defaults) and the tail path (``spectrum="tail"``, built on another
   branch: reported "n/a" where this esdwatch has no such option), median of the
   repetitions after one warm-up; weightwatcher 0.7.x's defaults once per shape on a
   one-layer model (its GPU path: torch's SVD on CUDA when CUDA is present). Alpha of each
   and the 7B-model total from the per-shape times (32 blocks x 7 matrices + embedding
   and head).
2. **Training slowdown**: a GPT-like model (token embedding, ``nn.TransformerEncoder``
   layers, head; 106M parameters on CUDA) trained with AdamW on random tokens, the same
   seed and batches in every configuration; configurations alternate within each round
   (the order rotates) and the ratio to the unmonitored run of the same round is the
   median over rounds. Measured: the training loop's wall time (synchronized) with the
   monitor's ``step`` calls, then ``close()`` (the final drain, at most 5 s) apart. Configurations:
   none; ``every_n_steps=50`` with the analysis on CPU copies (the default), with
   ``device="cuda"`` (GPU only), and with ``layers_per_snapshot="auto"``; ``"auto"``
   without and with rotation. Target: <= 1.03 at ``every_n_steps=50``.
3. **Lightning FSDP end to end** (CUDA only): ``Trainer(strategy=FSDPStrategy(auto_wrap_policy=
   {TransformerEncoderLayer}))`` with ``ESDMonitor``, without and with a rotation; checked:
   records at the scheduled steps, names without FSDP's wrapper components, the FSDP1 path
   taken (``monitor.mode == "fsdp1"``), every layer covered.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import esdwatch  # noqa: E402
from esdwatch.engine.layers import find_layers  # noqa: E402
from esdwatch.engine.synthetic import heavy_tailed  # noqa: E402
from esdwatch.monitor import Monitor  # noqa: E402
from esdwatch.rundir import read_records  # noqa: E402

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]
#: matrices of each shape in a Llama-7B model: 32 blocks x (q, k, v, o; gate, up; down), embedding + head
LLAMA_COUNTS = {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32, (32000, 4096): 2}

#: per mode: shape divisor, model (vocab, width, layers, ff, heads), batch, seq, steps per run, rounds
SETTINGS: dict[str, dict[str, Any]] = {
    "gpu": dict(div=1, model=(32000, 768, 8, 3072, 12), batch=16, seq=128, steps=400, rounds=2, reps=3),
    "cpu": dict(div=8, model=(2000, 128, 6, 512, 4), batch=8, seq=32, steps=300, rounds=2, reps=2),
    "smoke": dict(div=32, model=(500, 64, 2, 128, 2), batch=4, seq=16, steps=60, rounds=1, reps=1),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return "n/a" if isinstance(x, float) and not math.isfinite(x) else format(x, spec)


# ----------------------------------------------------------------------------- 1. engine


def tail_analysis(W: torch.Tensor, device: str | None) -> Any:
    """``spectrum="tail"`` where this esdwatch has it (another branch builds it), else None."""
    try:
        return esdwatch.analyze_matrix(W, device=device, spectrum="tail")
    except TypeError as exc:  # no such option here
        if "spectrum" in str(exc):
            return None
        raise


def ww_alpha(W: torch.Tensor) -> tuple[float, float]:
    """weightwatcher's defaults on a one-layer model holding ``W``: (seconds, alpha)."""
    import logging

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    N, M = W.shape
    lin = nn.Linear(M, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.detach().cpu())
    model = nn.Sequential(lin)
    t0 = time.perf_counter()
    details = ww.WeightWatcher(model=model).analyze()
    dt = time.perf_counter() - t0
    return dt, float(details["alpha"].iloc[0]) if len(details) else float("nan")


def engine_part(res: common.Results, device: str, s: dict[str, Any], use_ww: bool, deadline: float) -> None:
    dev = "cuda" if device == "cuda" else None
    shapes = [(n // s["div"], m // s["div"]) for n, m in LLAMA_SHAPES]
    warm = heavy_tailed(256, 128, seed=1, mu=3.0, dtype=torch.float32).to(device)
    esdwatch.analyze_matrix(warm, device=dev)  # cuSOLVER / BLAS start-up outside the timings
    rows, per_shape = [], {}
    for k, (N, M) in enumerate(shapes):
        W = heavy_tailed(N, M, seed=10 + k, mu=2.0, dtype=torch.float32).to(device)  # alpha about 2.7
        reps = s["reps"] if time.perf_counter() < deadline else 1
        exact_t, exact = [], None
        for _ in range(reps):
            dt, exact = _timed(partial(esdwatch.analyze_matrix, W, device=dev), device)
            exact_t.append(dt)
        tail_t, tail = [], None
        for _ in range(reps):
            dt, tail = _timed(partial(tail_analysis, W, dev), device)
            if tail is None:
                break
            tail_t.append(dt)
        ww_t, ww_a = (None, None)
        if use_ww and time.perf_counter() < deadline:
            try:
                ww_t, ww_a = ww_alpha(W)
            except Exception as exc:  # weightwatcher missing or failing: say so, go on
                ww_t, ww_a = None, f"failed: {type(exc).__name__}"
        te = statistics.median(exact_t)
        tt = statistics.median(tail_t) if tail_t else None
        per_shape[LLAMA_SHAPES[k]] = (te, tt)
        rows.append(
            [
                f"{N}x{M}",
                fmt(te),
                fmt(tt),
                fmt(te / tt if tt else None, ".1f"),
                fmt(ww_t),
                fmt(exact.alpha, ".3f"),
                fmt(getattr(tail, "alpha", None), ".3f"),
                fmt(abs(tail.alpha - exact.alpha) if tail is not None else None, ".4f"),
                "n/a" if tail is None else ("yes" if tail.xmin == exact.xmin else "no"),
                "n/a" if tail is None else ("yes" if (tail.num_traps > 0) == (exact.num_traps > 0) else "no"),
                fmt(ww_a, ".3f"),
                str(exact.n_tail),
            ]
        )
        del W
    head = [
        "shape",
        "exact s",
        "tail s",
        "speed-up",
        "weightwatcher s",
        "alpha exact",
        "alpha tail",
        "|d alpha|",
        "same x_min",
        "same trap decision",
        "alpha ww",
        "n_tail",
    ]
    res.add(
        f"## Engine on Llama-7B shapes ({device})\n\n"
        f"Each side divided by {s['div']}. "
        * (s["div"] > 1)
        + "Median of the repetitions after a warm-up; esdwatch exact = the defaults (float64 eigenvalues, MP fit, "
        "phases, trap test); weightwatcher = `WeightWatcher(model).analyze()` defaults (no trap test).\n\n"
        + md_table(head, rows)
    )
    full = sum(LLAMA_COUNTS[sh] * t[0] for sh, t in per_shape.items())
    tail_all = [t[1] for t in per_shape.values()]
    tail_txt = (
        fmt(sum(LLAMA_COUNTS[sh] * t[1] for sh, t in per_shape.items()) / 60, ".2f") + " min"
        if all(x is not None for x in tail_all)
        else "n/a"
    )
    if s["div"] == 1:
        res.add(f"A 7B model's 226 matrices from these per-shape times: exact {full / 60:.2f} min, tail {tail_txt}.")


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. training slowdown


class TinyGPT(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` layers, a head (no tying): a GPT-like parameter layout."""

    def __init__(self, vocab: int, width: int, layers: int, ff: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(x)))


def configs(device: str) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {"none": None, "every_n_steps=50": dict(every_n_steps=50)}
    if device == "cuda":
        out['every_n_steps=50, device="cuda"'] = dict(every_n_steps=50, device="cuda")
    out['every_n_steps=50, layers_per_snapshot="auto"'] = dict(every_n_steps=50, layers_per_snapshot="auto")
    out['"auto"'] = dict(every_n_steps="auto")
    out['"auto", layers_per_snapshot="auto"'] = dict(every_n_steps="auto", layers_per_snapshot="auto")
    return out


def train_once(cfg: dict[str, Any] | None, device: str, s: dict[str, Any], log_dir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyGPT(*s["model"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = s["model"][0]
    batches = [torch.randint(vocab, (s["batch"], s["seq"] + 1), generator=g).to(device) for _ in range(8)]
    mon = None
    if cfg is not None:
        # a bounded final drain: a snapshot still in the worker is cut off (its close() time is listed)
        mon = Monitor(model, log_dir=log_dir, at_end=False, verbose=False, drain_timeout=5.0, **cfg)
        mon.start()
    loss_fn = nn.CrossEntropyLoss()
    _sync(device)
    t0 = time.perf_counter()
    for step in range(1, s["steps"] + 1):
        b = batches[step % len(batches)]
        loss = loss_fn(model(b[:, :-1]).reshape(-1, vocab), b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step)
    _sync(device)
    loop_s = time.perf_counter() - t0
    out: dict[str, Any] = {"loop_s": loop_s, "params": sum(p.numel() for p in model.parameters())}
    if mon is not None:
        t1 = time.perf_counter()
        mon.close()
        out["close_s"] = time.perf_counter() - t1
        st = mon.stats
        layers = {r.name for r in read_records(Path(log_dir) / "esdwatch")} if st["analysed"] else set()
        out.update(
            snapshots=int(st["snapshots"]),
            skipped=int(st["skipped"]),
            analysed=int(st["analysed"]),
            layers=int(st["layers_analysed"]),
            covered=len(layers),
            watched=len(find_layers(model)[0]),
            hook_s=st["hook_s"],
            interval=mon.interval,
        )
    return out


def slowdown_part(res: common.Results, device: str, s: dict[str, Any], deadline: float) -> None:
    cfgs = configs(device)
    names = list(cfgs)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="esdwatch-gpu-check-") as tmp:
        train_once(None, device, dict(s, steps=min(20, s["steps"])), tmp)  # warm-up (allocator, kernels)
        for rnd in range(s["rounds"]):
            if rnd and time.perf_counter() > deadline:
                break
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            got = {}
            for n in order:
                got[n] = train_once(cfgs[n], device, s, os.path.join(tmp, f"r{rnd}-{names.index(n)}"))
                runs[n].append(got[n])
            for n in names:
                ratios[n].append(got[n]["loop_s"] / got["none"]["loop_s"])
    params = runs["none"][0]["params"]
    rows = []
    for n in names:
        r = runs[n][-1]
        rows.append(
            [
                n,
                fmt(statistics.median(x["loop_s"] for x in runs[n])),
                fmt(statistics.median(ratios[n]), ".4f"),
                fmt(r.get("close_s")),
                fmt(r.get("hook_s")),
                str(r.get("snapshots", "-")),
                str(r.get("skipped", "-")),
                str(r.get("layers", "-")),
                f"{r['covered']}/{r['watched']}" if "covered" in r else "-",
                str(r.get("interval", "-")),
            ]
        )
    head = [
        "configuration",
        "loop s",
        "slowdown (median paired ratio)",
        "close() s",
        "hook s",
        "snapshots",
        "skipped",
        "layer analyses",
        "layers covered",
        "final interval",
    ]
    v, w, nl, ff, heads = s["model"]
    res.add(
        f"## Training slowdown ({device})\n\n"
        f"Model: embedding {v}x{w}, {nl} TransformerEncoder layers (width {w}, ff {ff}, {heads} heads), head "
        f"{w}x{v}: {params / 1e6:.1f}M parameters; batch {s['batch']} x {s['seq']} tokens, AdamW, "
        f"{s['steps']} steps per run, {len(runs['none'])} round(s). Monitor defaults otherwise (thread worker, "
        "float64, trap test), at_end=False; the loop time includes every `step` call, `close()` (the final "
        "drain, bounded by drain_timeout=5 s: a snapshot still in the worker then is cut off) is listed apart.\n\n"
        + md_table(head, rows)
    )
    key = "every_n_steps=50"
    res.add(
        f"Slowdown at every_n_steps=50 (analysis on CPU copies): {statistics.median(ratios[key]):.4f} "
        f'(target <= 1.03); with layers_per_snapshot="auto": '
        f"{statistics.median(ratios[key + ', layers_per_snapshot=' + chr(34) + 'auto' + chr(34)]):.4f}."
    )


# ----------------------------------------------------------------------------- 3. FSDP


def fsdp_part(res: common.Results, device: str, s: dict[str, Any]) -> None:
    if device != "cuda":
        res.add('## Lightning FSDP\n\nn/a: Lightning\'s `"fsdp"` strategy needs CUDA (it refuses CPU).')
        return
    import lightning.pytorch as L
    from lightning.pytorch.strategies import FSDPStrategy

    from esdwatch.lightning import ESDMonitor

    vocab, width, nl, ff, heads = 4000, 256, 4, 1024, 4

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyGPT(vocab, width, nl, ff, heads)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return nn.functional.cross_entropy(self.net(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(vocab, (256, 33), generator=g)), batch_size=8
    )
    expected = {m.name for m in find_layers(Task())[0]}
    rows = []
    for label, extra in (("all layers", {}), ("layers_per_snapshot=4", {"layers_per_snapshot": 4})):
        with tempfile.TemporaryDirectory(prefix="esdwatch-fsdp-") as tmp:
            cb = ESDMonitor(every_n_steps=10, logger_sinks=False, verbose=False, on_backpressure="block", **extra)
            trainer = L.Trainer(
                accelerator="cuda",
                devices=1,
                strategy=FSDPStrategy(auto_wrap_policy={nn.TransformerEncoderLayer}),
                max_steps=30,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp,
                callbacks=[cb],
            )
            t0 = time.perf_counter()
            trainer.fit(Task(), data)
            dt = time.perf_counter() - t0
            recs = read_records(Path(tmp) / "esdwatch")
            names = {r.name for r in recs}
            steps = sorted({r.global_step for r in recs})
            wrapped = [n for n in names if "_fsdp_wrapped_module" in n]
            rows.append(
                [
                    label,
                    str(cb.monitor.mode),
                    ", ".join(map(str, steps)),
                    str(len(recs)),
                    f"{len(names & expected)}/{len(expected)}",
                    "yes" if names == expected else f"no ({sorted(names ^ expected)[:4]})",
                    str(len(wrapped)),
                    fmt(sum(1 for r in recs if math.isfinite(r.report.alpha)) / max(1, len(recs)), ".2f"),
                    fmt(dt, ".1f"),
                ]
            )
    head = [
        "run",
        "mode",
        "record steps",
        "records",
        "layers covered",
        "names = unwrapped model's",
        "wrapped names",
        "finite alpha",
        "fit s",
    ]
    res.add(
        "## Lightning FSDP (cuda, 1 device)\n\n"
        "`Trainer(strategy=FSDPStrategy(auto_wrap_policy={TransformerEncoderLayer}), max_steps=30)` with "
        "`ESDMonitor(every_n_steps=10)`: a 4-layer TransformerEncoder LM (width 256). One GPU, so one rank: "
        "the FSDP1 `summon_full_params` path is exercised, the sharing over ranks is not.\n\n" + md_table(head, rows)
    )


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smallest CPU version, for the test suite")
    ap.add_argument("--cpu", action="store_true", help="the CPU fallback even where CUDA is available")
    ap.add_argument("--out", default=None, help="where the result file goes")
    ap.add_argument("--no-ww", action="store_true", help="leave weightwatcher out")
    ap.add_argument("--budget-s", type=float, default=420.0, help="trim repetitions to end within about this")
    ap.add_argument("--parts", default="engine,slowdown,fsdp", help="comma-separated parts to run (default: all)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    cuda = torch.cuda.is_available() and not args.cpu and not args.smoke
    device = "cuda" if cuda else "cpu"
    mode = "smoke" if args.smoke else ("gpu" if cuda else "cpu")
    s = SETTINGS[mode]
    name = "gpu_check" if mode != "cpu" else "gpu_check_cpu"
    ns = argparse.Namespace(
        smoke=args.smoke, quick=args.smoke, out=args.out or (None if args.smoke else str(common.RESULTS))
    )
    res = common.Results(
        name,
        ns,
        "Experiment: GPU check (issue 15): engine on Llama-7B shapes, training slowdown, Lightning FSDP",
        common.command_line("gpu_check.py", argv),
        provenance="Spectral numbers from esdwatch.analyze_matrix and the monitor's records.jsonl.",
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        torch.set_num_threads(1)
        gpu = "no CUDA: the CPU fallback"
    res.add(f"## Setup\n\nDevice: {gpu}; mode {mode}.")
    t0 = time.perf_counter()
    verdicts = []
    parts: list[tuple[str, Callable[[], None]]] = [
        ("engine", lambda: engine_part(res, device, s, not args.no_ww and not args.smoke, t0 + 0.35 * args.budget_s)),
        ("slowdown", lambda: slowdown_part(res, device, s, t0 + 0.75 * args.budget_s)),
        ("fsdp", lambda: fsdp_part(res, device, s)),
    ]
    wanted = {p.strip() for p in args.parts.split(",")}
    for label, run in parts:
        if label not in wanted:
            continue
        t = time.perf_counter()
        try:
            run()
            verdicts.append(f"{label}: ran ({time.perf_counter() - t:.0f} s)")
        except Exception:  # one failing part must not lose the others' numbers
            res.add(f"## {label}: FAILED\n\n```\n{traceback.format_exc()[-3000:]}\n```")
            verdicts.append(f"{label}: FAILED")
    res.add("## Verdict\n\n" + "; ".join(verdicts) + ". The figures are above; the targets are stated with them.")
    res.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
