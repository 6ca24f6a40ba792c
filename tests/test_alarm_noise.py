"""Alarms that inform instead of flooding (issue 14, item 9): one log line per alarm kind and snapshot,
naming its layers, and every alarm of a step kept in TensorBoard's Text tab."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from esdwatch.alarms import AlarmRule
from esdwatch.errors import EsdwatchWarning
from esdwatch.monitor import Monitor
from esdwatch.rundir import read_alarms

OPTS = dict(min_evals=8, traps=False, on_backpressure="block", verbose=False)


def _wide(n_layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(n_layers)])


def test_one_line_and_one_warning_per_kind_whatever_the_number_of_layers(tmp_path, caplog):
    rules = [AlarmRule("alpha_high", "alpha", 0.0, above=True, severity="info")]  # every layer crosses it
    mon = Monitor(
        _wide(12),
        every_n_steps=1,
        at_end=False,
        log_dir=tmp_path,
        alarm_rules=rules,
        alarm_patience=1,
        alarm_actions={"alpha_high": "warn"},
        **OPTS,
    )
    with caplog.at_level(logging.INFO, logger="esdwatch"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.step(1)
        mon.drain()
    mon.close()
    lines = [r.getMessage() for r in caplog.records if "esdwatch alarm [alpha_high]" in r.getMessage()]
    assert len(lines) == 1 and "at step 1 on 12 layers" in lines[0] and "and 4 more" in lines[0]
    assert sum(issubclass(w.category, EsdwatchWarning) for w in caught) == 1
    assert len(read_alarms(tmp_path)) == 12  # every alarm is still a record


def test_every_alarm_of_a_step_is_in_the_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from esdwatch.sinks import TensorBoardSink

    rules = [AlarmRule("alpha_high", "alpha", 0.0, above=True, severity="info")]
    writer = SummaryWriter(str(tmp_path / "tb"))
    mon = Monitor(
        _wide(3),
        every_n_steps=1,
        at_end=False,
        alarm_rules=rules,
        alarm_patience=1,
        sinks=[TensorBoardSink(writer, figures=False)],
        **OPTS,
    )
    mon.step(1)
    mon.drain()
    mon.close()
    writer.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    texts = [e for e in ea.Tensors("esdwatch/alarms/text_summary") if e.step == 1]
    last = texts[-1].tensor_proto.string_val[0].decode()  # what TensorBoard shows for step 1
    assert all(f"layer `{i}`" in last for i in ("0", "1", "2"))
    assert "threshold 0" in last
    assert "*advice*: 0 is random-like" in last  # what to do about it, beside why
