"""Every Python block of README.md runs as written (the Hugging Face ones: tests/test_huggingface.py).

The blocks are extracted from README.md, not copied. What they assume exists is defined
here as a reader would have it: ``model`` and ``datamodule`` are the demo's digits MLP and
data, ``loader`` / ``optimizer`` a plain PyTorch loop's, ``evals`` / ``N`` / ``M`` / ``W`` one
weight matrix and its eigenvalues. The one change to the environment: ``Trainer`` stops
after a few dozen steps (the blocks leave the length of training to the reader).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from esdwatch.rundir import read_records

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: the README's sections, by heading
SECTIONS = dict(re.findall(r"\n## (.+?)\n(.*?)(?=\n## |\Z)", README, re.S))


def _blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", SECTIONS[section], re.S)


def test_every_python_block_is_covered():
    covered = {"Watch a training run": 3, "Hugging Face": 2, "Analyze a model offline": 1}
    assert {s: len(_blocks(s)) for s in SECTIONS if _blocks(s)} == covered


@pytest.fixture
def short_trainer(monkeypatch, tmp_path):
    """``lightning.pytorch.Trainer`` that stops after 40 steps, writes under tmp_path and prints little."""
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("sklearn")
    base = pl.Trainer

    class ShortTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.update(max_steps=40, enable_progress_bar=False, enable_model_summary=False)
            kwargs.setdefault("default_root_dir", str(tmp_path))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", ShortTrainer)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _digits():
    from esdwatch.demo import DigitsDataModule, DigitsMLP

    torch.manual_seed(0)
    return {"model": DigitsMLP(), "datamodule": DigitsDataModule()}


def test_the_callback_blocks_run_as_written(short_trainer):
    first, summary_callbacks, _ = _blocks("Watch a training run")
    exec(compile(first, "README.md", "exec"), _digits())
    records = read_records(next(short_trainer.glob("**/esdwatch/records.jsonl")))
    assert {r.global_step for r in records} == {40}  # every_n_steps=200 > 40 steps: the final snapshot

    # EarlyStopping / ModelCheckpoint on a summary key: a value exists from epoch 0 (no "not available")
    for path in short_trainer.glob("**/esdwatch"):
        for f in path.iterdir():
            f.unlink()
    ns = _digits()
    exec(compile(summary_callbacks, "README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.global_step == 40
    assert "esdwatch/summary/alpha_weighted" in trainer.callback_metrics
    records = read_records(next(short_trainer.glob("**/esdwatch/records.jsonl")))
    assert {r.global_step for r in records} == {0, 40}  # the baseline and the final snapshot


def test_the_plain_loop_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (_, _, loop) = _blocks("Watch a training run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(120)]
    exec(compile(loop, "README.md", "exec"), {"model": model, "loader": loader, "optimizer": optimizer})
    records = read_records(tmp_path / "runs" / "esd")
    assert sorted({r.global_step for r in records}) == [100, 120]
    assert {r.name for r in records} == {"0", "2"}


def test_the_offline_block_runs_as_written():
    (block,) = _blocks("Analyze a model offline")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    W = model[0].weight.detach()
    evals = torch.linalg.eigvalsh(W.double().T @ W.double()).numpy()
    ns = {"model": model, "W": W, "evals": evals, "N": 128, "M": 64}
    exec(compile(block, "README.md", "exec"), ns)
    assert len(ns["report"]) == 1 and ns["report"].names == ["0"]
