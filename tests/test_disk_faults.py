"""A run directory that refuses writes never crashes training and loses no record (issue 14, item 5).

Real faults: a ``log_dir`` that is a regular file (the directory cannot be created:
``NotADirectoryError`` at start) and the kernel's file-size limit (``RLIMIT_FSIZE``: every
append to ``records.jsonl`` fails with ``EFBIG``, as on a full disk with ``ENOSPC``).
Training goes on with one warning per outage, the dashboards (here a recording sink)
still get every snapshot, and once the directory takes writes again every record held
back is written, in step order.
"""

from __future__ import annotations

import logging
import resource

import pytest
import torch
from torch import nn

from esdwatch.monitor import Monitor
from esdwatch.rundir import read_records

OPTS = dict(min_evals=8, traps=False, on_backpressure="block")


class Recorder:
    def __init__(self):
        self.steps: list[int] = []

    def write(self, records, step):
        self.steps.append(step)

    def alarm(self, alarm):
        pass

    def close(self):
        pass


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "write to" in r.getMessage()]


def test_an_unwritable_log_dir_at_start_costs_a_warning_and_the_records_arrive_when_it_is_fixed(tmp_path, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    rec = Recorder()
    mon = Monitor(_mlp(), every_n_steps=2, log_dir=blocker, sinks=[rec], **OPTS)
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        for step in range(1, 9):
            mon.step(step)
            mon.drain()
            if step == 5:
                blocker.unlink()  # the directory can be created from now on
        mon.close()
    assert rec.steps == [2, 4, 6, 8]  # the dashboards never missed a snapshot
    assert [m for m in _warnings(caplog) if "cannot write" in m][:1] and len(
        [m for m in _warnings(caplog) if "cannot write" in m]
    ) == 1
    assert any("writable again" in m for m in _warnings(caplog))
    records = read_records(blocker / "esdwatch")
    assert [(r.global_step, r.name) for r in records] == [(s, n) for s in (2, 4, 6, 8) for n in ("0", "2")]


def test_a_full_disk_mid_run_loses_nothing_once_space_returns(tmp_path, caplog):
    # the kernel's file-size limit (RLIMIT_FSIZE) refuses every append to records.jsonl
    # with EFBIG, as a full disk refuses it with ENOSPC; Python ignores SIGXFSZ
    out = tmp_path / "esdwatch"
    rec = Recorder()
    mon = Monitor(_mlp(), every_n_steps=1, log_dir=tmp_path, sinks=[rec], **OPTS)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
            for step in range(1, 10):
                if step == 3:  # "the disk is full": no file may grow past records.jsonl's size
                    resource.setrlimit(resource.RLIMIT_FSIZE, ((out / "records.jsonl").stat().st_size, hard))
                if step == 7:  # space is back
                    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                mon.step(step)
                mon.drain()
            mon.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert rec.steps == list(range(1, 10))
    assert sum("cannot write" in m for m in _warnings(caplog)) == 1
    assert any("writable again" in m for m in _warnings(caplog))
    records = read_records(out)
    assert [(r.global_step, r.name) for r in records] == [(s, n) for s in range(1, 10) for n in ("0", "2")]


def test_a_lightning_run_whose_log_dir_is_unusable_trains_to_the_end(tmp_path, caplog):
    import _lightning_helpers as H
    from esdwatch.lightning import ESDMonitor

    blocker = tmp_path / "logs"
    blocker.write_text("not a directory")
    rec = Recorder()
    cb = ESDMonitor(every_n_steps=4, log_dir=str(blocker), sinks=[rec], **OPTS)
    trainer = H.trainer(tmp_path, [cb], max_steps=12)
    with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
        trainer.fit(H.net())
    assert trainer.global_step == 12 and rec.steps == [4, 8, 12]
    assert sum("cannot write" in m for m in _warnings(caplog)) == 1
    assert blocker.is_file()  # nothing was written over the user's file


@pytest.mark.parametrize("strict", [True])
def test_strict_mode_raises_the_disk_error_on_the_training_thread(tmp_path, strict):
    from esdwatch.monitor import EsdwatchError

    blocker = tmp_path / "logs"
    blocker.write_text("x")
    mon = Monitor(_mlp(), every_n_steps=1, log_dir=blocker, strict=strict, **OPTS)
    with pytest.raises(EsdwatchError, match="cannot write to"):
        mon.step(1)
    mon.abort()
