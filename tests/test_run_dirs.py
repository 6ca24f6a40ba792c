"""Two runs or two monitors never hide each other's history (issue 14, item 6).

A run's records go to a directory of its own (W&B: ``<save_dir>/<run id>``); two monitors
whose directories resolve to one path (a relative and an absolute spelling) are refused at
setup; a fresh run writing where an earlier run wrote is warned about.
"""

from __future__ import annotations

import logging

import pytest

import _lightning_helpers as H
from esdwatch.monitor import Monitor
from esdwatch.rundir import read_records
from test_sink_wandb import offline_wandb  # noqa: F401 - the fixture

OPTS = dict(min_evals=8, traps=False, on_backpressure="block", verbose=False)


def test_two_wandb_runs_with_one_save_dir_keep_both_histories(tmp_path, offline_wandb):  # noqa: F811
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("wandb")
    from esdwatch.lightning import ESDMonitor

    dirs = []
    for _run in range(2):
        logger = L.loggers.WandbLogger(save_dir=str(tmp_path / "wb"), offline=True, project="p")
        cb = ESDMonitor(every_n_steps=4, **OPTS)
        H.trainer(tmp_path, [cb], max_steps=8, logger=logger).fit(H.net())
        dirs.append(cb.monitor.output_dir)
        logger.experiment.finish()
    assert dirs[0] != dirs[1] and all(d.is_relative_to(tmp_path / "wb") for d in dirs)
    for d in dirs:
        assert sorted({r.global_step for r in read_records(d)}) == [4, 8]


def test_two_monitors_on_one_path_spelled_differently_are_refused(tmp_path, monkeypatch):
    from esdwatch.lightning import ESDMonitor

    monkeypatch.chdir(tmp_path)
    a = ESDMonitor(every_n_steps=4, log_dir="logs", **OPTS)
    b = ESDMonitor(every_n_steps=2, log_dir=str(tmp_path / "logs"), **OPTS)
    with pytest.raises(ValueError, match="same output directory"):
        H.trainer(tmp_path, [a, b], max_steps=4).fit(H.net())
    # the default directory spelled out beside a monitor that uses the default
    c = ESDMonitor(every_n_steps=4, **OPTS)
    d = ESDMonitor(every_n_steps=2, log_dir=str(tmp_path), **OPTS)
    with pytest.raises(ValueError, match="same output directory"):
        H.trainer(tmp_path, [c, d], max_steps=4).fit(H.net())


def test_a_fresh_run_in_a_directory_with_records_warns(tmp_path, caplog):
    for _run in range(2):
        mon = Monitor(H.mlp(), every_n_steps=2, log_dir=tmp_path, **OPTS)
        with caplog.at_level(logging.WARNING, logger="esdwatch.monitor"):
            for step in range(1, 5):
                mon.step(step)
            mon.close()
    warned = [r.getMessage() for r in caplog.records if "already holds the records of an earlier run" in r.getMessage()]
    assert len(warned) == 1 and "segment 1" in warned[0]
    assert len(read_records(tmp_path, dedupe=False)) == 2 * len(read_records(tmp_path))
