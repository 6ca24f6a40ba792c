"""Resuming from a checkpoint: the schedule, the alarm counters and exactly one record per (step, layer).

Single-process runs; the same under ``ddp_spawn`` is in test_ddp.py. The model, its data
and the Trainer come from ``_lightning_helpers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import _lightning_helpers as H  # noqa: E402
from esdwatch.lightning import ESDMonitor  # noqa: E402
from esdwatch.sinks.jsonl import read_alarms, read_records, read_segments  # noqa: E402
from esdwatch.sinks.spectra import read_spectra  # noqa: E402

OPTS = dict(min_evals=8, traps=False, logger_sinks=False, on_backpressure="block")
LAYERS = ("net.0", "net.2")


def _fit(root: Path, max_steps: int, ckpt_path=None, logger=False, extra=(), **monitor_kwargs):
    """One fit of the shared tiny model, snapshots every 4 steps, a checkpoint every 10."""
    cb = ESDMonitor(every_n_steps=4, **{**OPTS, **monitor_kwargs})
    ckpt = L.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    trainer = H.trainer(root, [*extra, cb, ckpt], max_steps=max_steps, logger=logger, enable_checkpointing=True)
    trainer.fit(H.net(), ckpt_path=ckpt_path)
    return trainer, cb


def test_resume_from_a_checkpoint_continues_at_the_next_scheduled_step(tmp_path):
    _, cb1 = _fit(tmp_path, 20, at_start=True, keep_evals=True)  # the run that "crashed" after step 20
    out = tmp_path / "esdwatch"
    assert sorted({r.global_step for r in read_records(out)}) == [0, 4, 8, 12, 16, 20]
    state = torch.load(tmp_path / "ckpt" / "step=10.ckpt", weights_only=False)["callbacks"][cb1.state_key]
    assert (state["last_step"], state["last_snapshot_step"], state["segment"]) == (10, 8, 0)

    trainer, cb2 = _fit(tmp_path, 26, ckpt_path=tmp_path / "ckpt" / "step=10.ckpt", at_start=True, keep_evals=True)
    assert trainer.global_step == 26 and cb2.monitor.segment == 1
    records = read_records(out)
    got = [(r.global_step, r.name, r.segment) for r in records]
    expected = [(s, n, 0) for s in (0, 4, 8) for n in LAYERS] + [
        (s, n, 1) for s in (12, 16, 20, 24, 26) for n in LAYERS
    ]
    assert got == expected  # no step-0 baseline on resume, nothing missing, nothing twice
    raw = [(r.global_step, r.segment) for r in read_records(out, dedupe=False)]
    assert raw.count((12, 0)) == 2 and raw.count((12, 1)) == 2  # the interrupted run's lines are still on disk
    assert [(s["segment"], s["resumed_from_step"]) for s in read_segments(out)] == [(0, None), (1, 10)]
    for line in (out / "records.jsonl").read_text().splitlines():
        json.loads(line)
    # keep_evals: spectra.jsonl follows the same segment rules, one histogram per (step, layer)
    assert list(read_spectra(out)) == [(s, n) for s, n, _ in expected]
    assert len((out / "spectra.jsonl").read_text().splitlines()) == len(raw)  # written alongside every record


def test_a_shorter_resumed_run_supersedes_everything_the_old_run_wrote_after_the_checkpoint(tmp_path):
    _fit(tmp_path, 20)
    _fit(tmp_path, 14, ckpt_path=tmp_path / "ckpt" / "step=10.ckpt")
    got = sorted({(r.global_step, r.segment) for r in read_records(tmp_path / "esdwatch")})
    assert got == [(4, 0), (8, 0), (12, 1), (14, 1)]  # the old 16 and 20 belong to an abandoned branch


def test_alarm_patience_counters_survive_the_resume(tmp_path):
    def kw():  # net.2 projected onto a fixed rank-2 subspace after every optimizer step
        return dict(alarm_patience={"rank_collapse": 3}, extra=[H.after_step(H.collapse_from(1))])

    _fit(tmp_path, 20, **kw())
    _fit(tmp_path, 14, ckpt_path=tmp_path / "ckpt" / "step=10.ckpt", **kw())
    lines = [json.loads(x) for x in (tmp_path / "esdwatch" / "alarms.jsonl").read_text().splitlines()]
    fired = [(d["segment"], d["step"]) for d in lines if d["kind"] == "rank_collapse"]
    # run 1: collapsed at 4, 8, 12 -> fires at 12. Run 2 restored the count (2, from 4 and 8) at step 10,
    # so its first collapsed snapshot (12) fires again; with fresh counters it would not fire before 20
    assert fired == [(0, 12), (1, 12)]
    assert [(a.step, a.layer) for a in read_alarms(tmp_path / "esdwatch") if a.kind == "rank_collapse"] == [
        (12, "net.2")
    ]


def test_resuming_into_a_new_logger_version_carries_the_history_over(tmp_path):
    csv = L.loggers.CSVLogger
    _fit(tmp_path, 20, logger=csv(str(tmp_path), name="run"), keep_evals=True)
    _fit(
        tmp_path,
        18,
        ckpt_path=tmp_path / "ckpt" / "step=10.ckpt",
        logger=csv(str(tmp_path), name="run"),
        keep_evals=True,
    )
    old, new = tmp_path / "run" / "version_0" / "esdwatch", tmp_path / "run" / "version_1" / "esdwatch"
    assert sorted({r.global_step for r in read_records(old)}) == [4, 8, 12, 16, 20]  # untouched
    got = sorted({(r.global_step, r.segment) for r in read_records(new)})
    assert got == [(4, 0), (8, 0), (12, 1), (16, 1), (18, 1)]  # complete on its own
    assert len(read_records(new)) == 2 * len(got)
    # the spectra came along: the history's up to the checkpoint, then the resumed run's own
    assert list(read_spectra(new)) == [(r.global_step, r.name) for r in read_records(new)]
    assert read_spectra(new)[(8, "net.2")].counts.tolist() == read_spectra(old)[(8, "net.2")].counts.tolist()
    assert sorted(read_spectra(old)) == sorted((r.global_step, r.name) for r in read_records(old))
