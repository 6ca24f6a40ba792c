"""The analyzer API and its defined outcomes on bad input (issue 2, 'Bad input')."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import esdwatch
from esdwatch import LayerReport, ModelReport, analyze, analyze_matrix


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 120), nn.ReLU(), nn.Linear(120, 10))


def test_analyze_model_reports_layers_and_skips():
    report = analyze(_mlp())
    assert isinstance(report, ModelReport)
    assert report.names == ["0", "2"]
    assert [s.name for s in report.skipped] == ["4"]
    assert "min_evals" in report.skipped[0].reason
    first = report["0"]
    assert isinstance(first, LayerReport)
    assert (first.N, first.M, first.Q) == (200, 100, 2.0)
    assert first.ok and first.num_evals == 100
    assert math.isfinite(first.alpha) and math.isfinite(first.entropy)


def test_report_is_frozen_and_serializable():
    report = analyze(_mlp(), keep_evals=True)
    layer = report[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.alpha = 1.0  # frozen dataclass
    assert layer.evals is not None and layer.evals.shape == (100,)
    records = report.to_records()
    text = json.dumps(records)  # plain types only
    back = json.loads(text)
    assert back[0]["name"] == "0" and "evals" not in back[0]
    assert LayerReport.from_dict(back[0]).alpha == pytest.approx(layer.alpha)
    summary = report.summary()
    assert set(summary) >= {
        "alpha",
        "alpha_weighted",
        "log_norm",
        "log_spectral_norm",
        "log_alpha_norm",
        "stable_rank",
        "entropy",
    }
    assert summary["alpha"] == pytest.approx(np.mean([l.alpha for l in report]))


def test_to_pandas():
    pd = pytest.importorskip("pandas")
    df = analyze(_mlp()).to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df["name"]) == ["0", "2"]


def test_state_dict_equals_module():
    model = _mlp()
    a = analyze(model, traps=False)
    b = analyze(model.state_dict(), traps=False)
    assert [(l.N, l.M) for l in a] == [(l.N, l.M) for l in b]
    for la, lb in zip(a, b):
        assert la.alpha == pytest.approx(lb.alpha, rel=1e-12)


def test_non_finite_layer_is_reported_and_others_analyzed():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
        model[0].weight[7, 1] = float("inf")
    report = analyze(model)
    bad = report["0"]
    assert bad.status == "non_finite" and bad.num_non_finite == 2
    assert math.isnan(bad.alpha)
    assert report["2"].ok
    kinds = [a.kind for a in report.alarms()]
    assert "non_finite" in kinds


def test_all_zero_matrix_is_degenerate():
    r = analyze_matrix(torch.zeros(100, 60))
    assert r.status == "degenerate"
    assert r.lambda_max == 0.0 and r.rank_collapse_fraction == 1.0
    assert math.isnan(r.alpha)


def test_rank_one_matrix():
    u, v = torch.randn(100, 1), torch.randn(1, 70)
    r = analyze_matrix(u @ v)
    assert r.ok
    assert r.stable_rank == pytest.approx(1.0, rel=1e-6)
    assert r.entropy == 0.0
    assert r.rank_collapse_fraction == pytest.approx(69 / 70)


def test_one_by_m_matrix():
    r = analyze_matrix(torch.randn(1, 500))
    assert (r.N, r.M) == (500, 1)
    assert r.num_evals == 1
    assert r.stable_rank == pytest.approx(1.0)
    assert math.isnan(r.alpha)  # one eigenvalue: no tail to fit


def test_constant_matrix():
    r = analyze_matrix(torch.full((80, 60), 0.3))
    assert r.ok
    assert r.stable_rank == pytest.approx(1.0, rel=1e-9)  # constant = rank one
    assert r.entropy == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    W = torch.randn(200, 100)
    r16 = analyze_matrix(W.to(dtype))
    r32 = analyze_matrix(W.to(dtype).float())
    assert r16.ok and r16.alpha == pytest.approx(r32.alpha, rel=1e-12)


def test_non_contiguous_tensor():
    W = torch.randn(100, 300)
    r1 = analyze_matrix(W.t())
    r2 = analyze_matrix(W.t().contiguous())
    assert r1.alpha == pytest.approx(r2.alpha, rel=1e-12)


def test_numpy_input():
    W = np.random.default_rng(0).standard_normal((150, 90))
    assert analyze_matrix(W).M == 90


def test_model_without_analyzable_layer(caplog):
    report = analyze(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    assert len(report) == 0 and len(report.skipped) == 1
    assert math.isnan(report.summary()["alpha"])
    assert report.alarms() == []


def test_model_with_no_parameters():
    report = analyze(nn.ReLU())
    assert len(report) == 0 and len(report.skipped) == 0


def test_float32_compute_option():
    model = _mlp()
    a = analyze(model, dtype=torch.float32, traps=False)
    b = analyze(model, traps=False)
    assert a[0].log_norm == pytest.approx(b[0].log_norm, rel=1e-5)


def test_exports():
    for name in ("analyze", "analyze_matrix", "fit_power_law", "LayerReport", "ModelReport"):
        assert getattr(esdwatch, name) is not None
    with pytest.raises(AttributeError):
        _ = esdwatch.does_not_exist


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_model_matches_cpu():
    model = _mlp()
    cpu = analyze(model, traps=False)
    gpu = analyze(model.cuda(), traps=False)
    for a, b in zip(cpu, gpu):
        assert a.alpha == pytest.approx(b.alpha, rel=1e-9)


def test_dead_units_counts_zero_rows_and_columns():
    W = torch.randn(120, 80)
    W[[3, 50, 90], :] = 0.0  # three dead output units
    W[:, [7, 9]] = 0.0  # two dead inputs
    r = analyze_matrix(W)
    assert r.dead_units == 5
    assert analyze_matrix(torch.randn(120, 80)).dead_units == 0


def test_lora_update_zeros_are_structural_not_rank_collapse():
    class LoraLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(128, 256)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(128, 64, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(64, 256, bias=False)})
            self.scaling = {"default": 2.0}

    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear())
    report = analyze(model, min_evals=8)
    lora = [layer for layer in report if layer.kind == "lora"]
    assert len(lora) == 1
    assert lora[0].num_evals == 64  # the inner rank, not M = 128
    assert lora[0].rank_collapse_fraction == 0.0
    assert all(a.kind != "rank_collapse" for a in report.alarms())
