"""ESDMonitor under a real 2-process DDP run on CPU (``ddp_spawn``, gloo).

Each scenario runs in a subprocess (``python tests/test_ddp.py <scenario> <dir>``) under a
timeout, so a deadlock (a collective reached by one rank only) fails the test instead of
hanging it. The subprocess trains with ``Trainer(accelerator="cpu", devices=2,
strategy="ddp_spawn")`` (twice for the resume scenario: a run, then a resume from its
checkpoint); every rank writes what it saw to ``rank<r>.json``; the assertions run here,
on the files. The model, its data and the Trainer come from ``_lightning_helpers``
(shared with test_lightning_callback.py and test_resume.py); ``ddp_spawn`` pickles the
model by reference to that module, which the spawned ranks import.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from _processes import run_bounded

L = pytest.importorskip("lightning.pytorch")
dist = pytest.importorskip("torch.distributed")

import _lightning_helpers as H  # noqa: E402
from esdwatch.engine.analyzer import analyze_layers  # noqa: E402
from esdwatch.engine.layers import find_layers  # noqa: E402
from esdwatch.lightning import ESDMonitor  # noqa: E402
from esdwatch.monitor import Monitor  # noqa: E402
from esdwatch.monitor.distributed import assign_owners, layer_cost  # noqa: E402
from esdwatch.sinks.jsonl import read_alarms, read_distributed, read_records, read_segments  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

OPTS = dict(min_evals=8, traps=False, logger_sinks=False, on_backpressure="block")
LAYERS = ["net.0", "net.2", "net.4"]  # net.6 (32 x 4) has M=4 < min_evals
METRICS = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "entropy",
    "lambda_max",
    "mp_sigma2",
    "lambda_plus",
    "num_spikes",
    "rank_collapse_fraction",
)
TIMEOUT_S = 240
RESUME_EVERY = 4


def _net() -> nn.Module:
    return H.mlp(H.DDP_WIDTHS)


def _model():
    """The shared tiny LightningModule with test_ddp's widths (picklable by reference for ddp_spawn)."""
    return H.net(widths=H.DDP_WIDTHS)


class Report(L.Callback):
    """Each rank writes what it saw to ``<prefix><rank>.json``; rank 0 also saves the final weights."""

    def __init__(self, out: str, prefix: str = "rank"):
        self.out, self.prefix = out, prefix

    def on_train_end(self, trainer, pl_module):
        mon = next(cb for cb in trainer.callbacks if isinstance(cb, ESDMonitor)).monitor
        ckpt = trainer.checkpoint_callback
        info = {
            "rank": trainer.global_rank,
            "global_step": trainer.global_step,
            "should_stop": trainer.should_stop,
            "layers_analysed": mon.stats["layers_analysed"],
            "exchanges": mon.stats["exchanges"],
            "snapshots": mon.snapshots,
            "owners": mon.owners,
            "mode": mon.mode,
            "segment": mon.segment,
            "summary": mon.latest_summary,
            "best_model_score": None if ckpt is None or ckpt.best_model_score is None else float(ckpt.best_model_score),
            "best_model_path": None if ckpt is None else ckpt.best_model_path,
        }
        Path(self.out, f"{self.prefix}{trainer.global_rank}.json").write_text(json.dumps(info))
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), Path(self.out, "final.pt"))


class PoisonAt(L.Callback):
    """At ``step`` (after the optimizer step, before ESDMonitor's snapshot) fill ``layer`` with NaN on every rank."""

    def __init__(self, step: int, layer: str):
        self.step, self.layer, self.done = step, layer, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                pl_module.get_submodule(self.layer).weight.fill_(float("nan"))


def _owners() -> dict[str, int]:
    mats = find_layers(_model(), min_evals=8)[0]
    return dict(zip([m.name for m in mats], assign_owners([layer_cost(m) for m in mats], 2)))


def _ddp_trainer(out: str, callbacks: list, max_steps: int, **kwargs):
    return H.trainer(out, callbacks, devices=2, strategy="ddp_spawn", max_steps=max_steps, **kwargs)


def _run_resume(out: str) -> None:
    """Two ddp_spawn fits: 16 steps with a checkpoint at step 10, then a resume from it to step 18."""
    root = Path(out)
    for prefix, max_steps, ckpt_path in (("first", 16, None), ("rank", 18, root / "ckpt" / "step=10.ckpt")):
        mon = ESDMonitor(every_n_steps=RESUME_EVERY, at_start=True, **OPTS)
        ckpt = L.callbacks.ModelCheckpoint(
            dirpath=root / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}"
        )
        trainer = _ddp_trainer(out, [mon, ckpt, Report(out, prefix)], max_steps, enable_checkpointing=True)
        trainer.fit(_model(), ckpt_path=ckpt_path)
        os.environ.pop("MASTER_PORT", None)  # a fresh port for the next fit's process group


def _run_scenario(scenario: str, out: str) -> None:
    """The subprocess: one ddp_spawn fit (two for "resume")."""
    torch.set_num_threads(1)
    root = Path(out)
    if scenario == "resume":
        _run_resume(out)
        return
    if scenario == "clean":
        mon = ESDMonitor(every_n_steps=5, at_start=True, **OPTS)
        ckpt = L.callbacks.ModelCheckpoint(
            dirpath=root / "ckpt",
            monitor="esdwatch/summary/stable_rank",
            mode="max",
            every_n_train_steps=5,
            save_top_k=2,
            filename="s{step}-sr{esdwatch/summary/stable_rank:.4f}",
            auto_insert_metric_name=False,
        )
        callbacks, max_steps = [mon, ckpt, Report(out)], 20
    elif scenario == "stop":
        rank1_layer = next(n for n, r in _owners().items() if r == 1)
        mon = ESDMonitor(every_n_steps=4, **OPTS)
        callbacks, max_steps = [PoisonAt(12, rank1_layer), mon, Report(out)], 60
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    trainer = _ddp_trainer(out, callbacks, max_steps, enable_checkpointing=scenario == "clean")
    trainer.fit(_model())


# ------------------------------------------------------------ sharing (no processes)


def test_assign_owners_is_cost_balanced_and_deterministic():
    costs = [5.0, 1.0, 4.0, 3.0, 3.0, 2.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(list(costs), 2)  # every rank computes the same
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert sorted(loads) == [9.0, 9.0]  # LPT: largest first to the least loaded rank
    assert assign_owners(costs, 1) == [0] * 6
    assert sorted(set(assign_owners([1.0] * 8, 3))) == [0, 1, 2]
    # a plan built piece by piece (FSDP1 units) carries the loads over
    loads = [0.0, 0.0]
    assert [assign_owners([c], 2, loads)[0] for c in (4.0, 1.0, 1.0, 1.0)] == [0, 1, 1, 1]
    assert loads == [4.0, 3.0]
    with pytest.raises(ValueError):
        assign_owners([1.0], 0)


def test_layer_cost_and_chunks_follow_torch_chunk():
    from esdwatch.monitor.distributed import _chunk_sizes

    mats = find_layers(_model(), min_evals=8)[0]
    assert [layer_cost(m) for m in mats] == [64 * 24**2, 64 * 48**2, 48 * 32**2]
    for n in (0, 1, 5, 53, 64):
        for parts in (1, 2, 3, 7):
            c, sizes = _chunk_sizes(n, parts)
            expected = [t.shape[0] for t in torch.arange(n).chunk(parts)] if n else []
            assert sizes[: len(expected)] == expected and sum(sizes) == n and all(s <= c for s in sizes)


def test_fsdp_names_are_cleaned_and_unit_patterns_select_only_their_modules():
    from esdwatch.monitor.distributed import _only, clean_fsdp_name

    assert clean_fsdp_name("net.0._fsdp_wrapped_module") == "net.0"
    assert clean_fsdp_name("_fsdp_wrapped_module.enc._checkpoint_wrapped_module.attn.in_proj.q") == "enc.attn.in_proj.q"
    assert clean_fsdp_name("net.0") == "net.0"
    model = nn.Sequential(nn.Linear(24, 64), nn.MultiheadAttention(32, 2), nn.Conv2d(8, 16, 3))
    names = [m.name for m in find_layers(model, min_evals=8, exclude=_only(["1"]))[0]]
    assert names == ["1.in_proj.q", "1.in_proj.k", "1.in_proj.v"]
    names = [m.name for m in find_layers(model, min_evals=1, conv_mode="slices", exclude=_only(["0", "2"]))[0]]
    assert names[0] == "0" and names[1:] == [f"2[{i},{j}]" for i in range(3) for j in range(3)]
    assert find_layers(model, min_evals=8, exclude=_only([]))[0] == []


# ------------------------------------------------------------ plain-loop DDP, "auto"


def _slow_on_rank1(mats, config):
    """analyze_layers, 100 ms slower on rank 1: the ranks measure different analysis times (a margin over
    the 40 ms the test asks for, so that a loaded machine's noise on rank 0 does not close the gap)."""
    if dist.get_rank() == 1:
        time.sleep(0.10)
    return analyze_layers(mats, config)


#: snapshots the "auto" scenario runs for, and the step count it gives up at
AUTO_SNAPSHOTS, AUTO_MAX_STEPS = 3, 3000


def _auto_worker(rank: int, world: int, out: str, port: int) -> None:
    """Plain loop, torch DDP, every_n_steps="auto": the ranks must agree on every snapshot step.

    The loop runs until AUTO_SNAPSHOTS snapshots are taken, not for a fixed number of steps:
    how many steps "auto" waits between snapshots is the measured analysis cost over the
    measured step time, which depends on the machine's load (a fixed 300 steps gave one
    snapshot only, on a busy machine, and nothing to agree on). ``mon.snapshots`` is agreed
    at the exchanges, so both ranks leave the loop at the same step.
    """
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = Monitor(
        model,
        every_n_steps="auto",
        max_overhead=0.5,
        rank=rank,
        world_size=world,
        log_dir=out,
        min_evals=8,
        traps=False,
        analyze_fn=_slow_on_rank1,
    )
    g = torch.Generator().manual_seed(rank)
    taken, intervals = [], []
    mon.start()
    step = 0
    while mon.snapshots < AUTO_SNAPSHOTS and step < AUTO_MAX_STEPS:
        step += 1
        loss = model(torch.randn(16, 24, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = mon.snapshots
        mon.step(step)
        if mon.snapshots > before:
            taken.append(step)
        intervals.append(mon.interval)
    mon.close()
    Path(out, f"auto{rank}.json").write_text(
        json.dumps(
            {
                "taken": taken,
                "intervals": intervals,
                "final": mon.snapshots,
                "cost": mon.parts.budget.cost_ema,
                "wall": mon.parts.budget.wall_ema,
                "last_step": step,
                "exchanges": mon.stats["exchanges"],
                "skipped": mon.stats["skipped"],
            }
        )
    )
    dist.destroy_process_group()


def _run_auto(out: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_auto_worker, args=(2, out, port), nprocs=2, join=True)


def _spawn(scenario: str, tmp_path: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    returncode, out = run_bounded(
        [sys.executable, __file__, scenario, str(tmp_path)],
        env=env,
        timeout_s=TIMEOUT_S,
        what=f"the ddp_spawn run ({scenario})",
    )
    assert returncode == 0, out[-6000:]
    return time.perf_counter() - t0


def _ranks(tmp_path: Path, prefix: str = "rank") -> list[dict]:
    return [json.loads((tmp_path / f"{prefix}{r}.json").read_text()) for r in (0, 1)]


def test_ddp_records_equal_a_single_process_analysis_and_layers_are_split(tmp_path):
    _spawn("clean", tmp_path)
    r0, r1 = _ranks(tmp_path)
    assert r0["global_step"] == r1["global_step"] == 20
    out = tmp_path / "esdwatch"
    # exactly one record per (step, layer), written once (no duplicates even before de-duplication)
    raw = [(r.global_step, r.name) for r in read_records(out, dedupe=False)]
    assert sorted(raw) == sorted((s, n) for s in (0, 5, 10, 15, 20) for n in LAYERS)
    assert len(raw) == len(set(raw))
    records = read_records(out)
    # the layers were split between the ranks, both did work, and the split is the cost-balanced one
    expected_owners = _owners()
    assert set(expected_owners.values()) == {0, 1}
    lines = read_distributed(out)
    assert [d["global_step"] for d in lines] == [0, 5, 10, 15, 20]
    for d in lines:
        assert d["owners"] == expected_owners and d["mode"] == "replicated" and d["world_size"] == 2
        assert all(r["layers"] > 0 and r["received"] for r in d["ranks"])
    assert r0["owners"] == r1["owners"] == expected_owners
    n1 = sum(1 for r in expected_owners.values() if r == 1)
    assert r1["layers_analysed"] == 5 * n1 and r0["layers_analysed"] == 5 * (len(LAYERS) - n1)
    # rank 0's final records equal a single-process analysis of the same (final) weights
    model = _model()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    config = Monitor(None, min_evals=8, traps=False).config
    expected = analyze_layers(find_layers(model, min_evals=8)[0], config)
    final = [r.report for r in records if r.global_step == 20]
    assert [r.name for r in final] == [r.name for r in expected] == LAYERS
    for got, want in zip(final, expected):
        assert got.status == want.status == "ok"
        for m in METRICS:
            a, b = float(getattr(got, m)), float(getattr(want, m))
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (got.name, m, a, b)
    # every rank computed the same model-level summary (ModelCheckpoint needs it on every rank)
    assert r0["summary"] == pytest.approx(r1["summary"], nan_ok=True)
    # a ModelCheckpoint monitoring an esdwatch summary worked under ddp_spawn, identically on both ranks
    assert r0["best_model_score"] is not None and math.isfinite(r0["best_model_score"])
    assert r0["best_model_score"] == r1["best_model_score"] and r0["best_model_path"] == r1["best_model_path"]
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 2 and all(n.startswith("s") and "-sr" in n for n in saved), saved
    for name in saved:  # the monitor's state went into each checkpoint (saved collectively, drained first)
        ck = torch.load(tmp_path / "ckpt" / name, weights_only=False)
        state = next(v for k, v in ck["callbacks"].items() if "ESDMonitor" in k)
        assert state["last_snapshot_step"] == state["last_step"] == ck["global_step"]


def test_a_stop_alarm_from_a_layer_analysed_by_rank_1_stops_both_ranks(tmp_path):
    _spawn("stop", tmp_path)
    r0, r1 = _ranks(tmp_path)
    owners = _owners()
    rank1_layer = next(n for n, r in owners.items() if r == 1)
    # the snapshot at step 12 (layer poisoned just before it) is analysed by rank 1, reaches rank 0 at the
    # exchange of step 16, where the non_finite alarm (action "stop") fires; both ranks stop at that step
    stops = [a for a in read_alarms(tmp_path / "esdwatch") if a.kind == "non_finite"]
    first = stops[0]
    assert (first.layer, first.step) == (rank1_layer, 12)
    assert r0["global_step"] == r1["global_step"] == 16
    assert r0["should_stop"] and r1["should_stop"]
    dist_lines = {d["global_step"]: d for d in read_distributed(tmp_path / "esdwatch")}
    assert dist_lines[12]["owners"][rank1_layer] == 1
    bad = [r for r in read_records(tmp_path / "esdwatch") if r.global_step == 12 and r.name == rank1_layer]
    assert len(bad) == 1 and bad[0].report.status == "non_finite"  # the record is kept


def test_resume_under_ddp_spawn_continues_at_the_next_scheduled_step_with_one_record_each(tmp_path):
    """A 2-process run checkpointed at step 10 (between the snapshots at 8 and 12) and run on to 16, then
    resumed from that checkpoint to 18: every rank restores the monitor's state, the history reads as one
    run continuing at step 12, and what the first run wrote after the checkpoint is superseded."""
    _spawn("resume", tmp_path)
    out = tmp_path / "esdwatch"
    first, resumed = _ranks(tmp_path, "first"), _ranks(tmp_path)
    assert [r["global_step"] for r in first] == [16, 16] and [r["global_step"] for r in resumed] == [18, 18]
    assert [r["segment"] for r in first] == [0, 0] and [r["segment"] for r in resumed] == [1, 1]
    # the checkpoint's monitor state (saved collectively, after a drain and an exchange)
    ck = torch.load(tmp_path / "ckpt" / "step=10.ckpt", weights_only=False)
    state = next(v for k, v in ck["callbacks"].items() if "ESDMonitor" in k)
    assert (ck["global_step"], state["last_step"], state["last_snapshot_step"], state["segment"]) == (10, 10, 8, 0)
    # first run: 0 (at_start), 4, 8, 12, 16. Resumed: the 3 up to the checkpoint (restored), then 12 and 16
    # (the schedule) and 18 (at_end); no second step-0 baseline
    assert [r["snapshots"] for r in first] == [5, 5] and [r["snapshots"] for r in resumed] == [6, 6]
    records = read_records(out)
    got = [(r.global_step, r.name, r.segment) for r in records]
    expected = [(s, n, 0) for s in (0, 4, 8) for n in LAYERS] + [(s, n, 1) for s in (12, 16, 18) for n in LAYERS]
    assert got == expected  # exactly one record per (step, layer): nothing missing, nothing twice
    assert all(r.report.status == "ok" and math.isfinite(r.report.alpha) for r in records)
    raw = [(r.global_step, r.name, r.segment) for r in read_records(out, dedupe=False)]
    assert len(raw) == len(set(raw))  # rank 0 alone wrote, each snapshot once per segment
    assert sorted({(s, g) for s, _, g in raw}) == [
        (0, 0),
        (4, 0),
        (8, 0),
        (12, 0),
        (12, 1),
        (16, 0),
        (16, 1),
        (18, 1),
    ]  # the first run's 12 and 16 are superseded, not erased
    assert [(s["segment"], s["resumed_from_step"]) for s in read_segments(out)] == [(0, None), (1, 10)]
    # after the resume both ranks still shared the layers, and every part reached rank 0
    owners = _owners()
    for d in read_distributed(out):
        assert d["owners"] == owners and all(r["received"] and r["layers"] > 0 for r in d["ranks"])
    assert [(d["segment"], d["global_step"]) for d in read_distributed(out) if d["segment"] == 1] == [
        (1, 12),
        (1, 16),
        (1, 18),
    ]
    # the resumed weights continued from the checkpoint: the final records equal an analysis of the final weights
    model = _model()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    expected_reports = analyze_layers(
        find_layers(model, min_evals=8)[0], Monitor(None, min_evals=8, traps=False).config
    )
    final = [r.report for r in records if r.global_step == 18]
    for got_r, want in zip(final, expected_reports, strict=True):
        for m in METRICS:
            a, b = float(getattr(got_r, m)), float(getattr(want, m))
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (got_r.name, m)


def test_auto_interval_is_agreed_by_every_rank(tmp_path):
    """every_n_steps="auto" under DDP: each rank measures its own analysis (rank 1's is 50 ms slower), the
    interval is decided from what all ranks sent at the exchanges, so every rank snapshots at the same steps."""
    _spawn("auto", tmp_path)
    a0, a1 = (json.loads((tmp_path / f"auto{r}.json").read_text()) for r in (0, 1))
    assert a0["taken"] == a1["taken"] and a0["intervals"] == a1["intervals"] and a0["skipped"] == a1["skipped"]
    assert a0["last_step"] == a1["last_step"] < AUTO_MAX_STEPS  # left the loop together, after 3 snapshots
    assert a0["wall"] + 0.04 < a1["wall"]  # measured differently (the sleep is wall time, not CPU) ...
    assert a0["cost"] > 0 and a1["cost"] > 0
    assert a0["taken"][0] == 10 and len(a0["taken"]) == AUTO_SNAPSHOTS  # ... yet decided identically
    interval = a0["intervals"][-1]
    # at least the worker's pace: 1.25 x the slowest rank's analysis wall time, in steps
    assert interval is not None and interval > 1
    assert all(b - a >= 1 for a, b in zip(a0["taken"], a0["taken"][1:]))
    steps = sorted({r.global_step for r in read_records(tmp_path / "esdwatch")})
    assert steps == a0["taken"]  # the at_end snapshot is the last taken one (the loop ended on it)
    assert all(all(r["received"] for r in d["ranks"]) for d in read_distributed(tmp_path / "esdwatch"))


if __name__ == "__main__":
    if sys.argv[1] == "auto":
        _run_auto(sys.argv[2])
    else:
        _run_scenario(sys.argv[1], sys.argv[2])
