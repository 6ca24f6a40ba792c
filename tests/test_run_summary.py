"""The end-of-run summary (issue 14, item 10): printed once when training ends, off with verbose=False."""

from __future__ import annotations

import torch
from torch import nn

import _lightning_helpers as H
from esdwatch.alarms import AlarmRule
from esdwatch.monitor import Monitor

OPTS = dict(min_evals=8, traps=False, on_backpressure="block")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_a_plain_loop_prints_the_last_snapshot_the_alarms_and_what_was_not_analysed(tmp_path, capsys):
    always = [AlarmRule("alpha_high", "alpha", 0.0, above=True, severity="info")]  # fires on every layer
    mon = Monitor(_mlp(), every_n_steps=2, log_dir=tmp_path, alarm_rules=always, alarm_patience=1, **OPTS)
    for step in range(1, 6):
        mon.step(step)
    mon.close()
    out = capsys.readouterr().out
    assert out.count("esdwatch: 3 snapshot(s) analysed; the last at step 5:") == 1
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert header.split() == [
        "layer",
        "shape",
        "phase",
        "alpha",
        "entropy",
        "stable_rank",
        "mp_softrank",
        "alarms",
        "status",
    ]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["2"])}
    assert rows["0"][1] == "32x24" and rows["2"][1] == "32x32" and rows["0"][-2] == "alpha_high"
    assert "alarms: alpha_high x2 (0, 2)" in out  # fires once per episode (patience 1), per layer
    assert "not analysed: 4 (" in out and "min_evals" in out  # the 4x32 head, with its reason
    assert f"records: {tmp_path / 'esdwatch' / 'records.jsonl'}" in out


def test_verbose_false_prints_nothing(tmp_path, capsys):
    mon = Monitor(_mlp(), every_n_steps=2, log_dir=tmp_path, verbose=False, **OPTS)
    for step in range(1, 4):
        mon.step(step)
    mon.close()
    assert "esdwatch:" not in capsys.readouterr().out


def test_a_trainer_prints_the_summary_once_at_the_end(tmp_path, capsys):
    from esdwatch.lightning import ESDMonitor

    cb = ESDMonitor(every_n_steps=4, **OPTS)
    H.trainer(tmp_path, [cb], max_steps=10).fit(H.net())
    out = capsys.readouterr().out
    assert out.count("esdwatch: 3 snapshot(s) analysed; the last at step 10:") == 1
    assert "net.0" in out and "net.2" in out and "alarms:" in out


def test_every_matrix_not_analysed_is_listed_once_with_its_reason(tmp_path):
    import json

    mon = Monitor(_mlp(), every_n_steps=1, log_dir=tmp_path, verbose=False, **OPTS)
    for step in range(1, 5):
        mon.step(step)
    mon.close()
    lines = [json.loads(x) for x in (tmp_path / "esdwatch" / "skipped_layers.jsonl").read_text().splitlines()]
    # the 4x32 head, once (the set of skipped matrices never changed)
    assert [(d["global_step"], d["name"], d["shape"]) for d in lines] == [(1, "4", [4, 32])]
    assert "min_evals" in lines[0]["reason"]
