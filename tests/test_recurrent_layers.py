"""Recurrent layers (issue 14, item 7): nn.LSTM / nn.GRU / nn.RNN and their cells, per gate.

PyTorch packs the gates of one layer and direction into one parameter, (G*H, X) with G = 4
(LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (RNN); find_layers gives one (H, X) view per
gate, named ``<state-dict key>.<gate>``, kind "recurrent".
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import esdwatch
from esdwatch import Monitor
from esdwatch.engine.layers import KINDS, LayerMatrix, find_layers
from esdwatch.sinks.jsonl import read_records

LSTM_GATES, GRU_GATES = ("i", "f", "g", "o"), ("r", "z", "n")


def _keys(num_layers: int, bidirectional: bool, proj: bool = False) -> list[str]:
    out = []
    for k in range(num_layers):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            out += [f"weight_ih_l{k}{sfx}", f"weight_hh_l{k}{sfx}"] + ([f"weight_hr_l{k}{sfx}"] if proj else [])
    return out


def _expected_names(prefix: str, keys: list[str], gates: tuple[str, ...]) -> list[str]:
    names = []
    for key in keys:
        if gates and not key.startswith("weight_hr"):
            names += [f"{prefix}.{key}.{g}" for g in gates]
        else:
            names.append(f"{prefix}.{key}")
    return names


def _is_view_of(view: torch.Tensor, param: torch.Tensor) -> bool:
    """``view`` lies inside ``param``'s memory (same storage, data within its bytes)."""
    if view.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return False
    lo, hi = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
    return lo <= view.data_ptr() < hi


def _check_gates(mats: list[LayerMatrix], module: nn.Module, prefix: str, gates: tuple[str, ...]) -> None:
    """Every matrix equals its gate's row block of the packed parameter and is a view of it."""
    for m in mats:
        key = m.param_name[len(prefix) + 1 :]
        packed = getattr(module, key)
        assert m.kind == "recurrent" and m.module_type == type(module).__name__
        assert m.num_slices == 1 and m.N >= m.M and m.scale == 1.0
        if m.name == m.param_name:  # not split: RNN weights, LSTM projection
            block = packed
        else:
            g = gates.index(m.name.rsplit(".", 1)[1])
            H = module.hidden_size
            block = packed[g * H : (g + 1) * H]
        assert m.shape == tuple(block.shape)
        oriented = m.weight[0] if m.weight.shape[1] == block.shape[0] else m.weight[0].T
        assert torch.equal(oriented, block)
        assert _is_view_of(m.weight, packed), m.name


# ------------------------------------------------------------------------- discovery


def test_recurrent_is_a_kind():
    assert "recurrent" in KINDS


def test_bidirectional_two_layer_lstm_with_projection():
    torch.manual_seed(0)
    lstm = nn.LSTM(48, 64, num_layers=2, bidirectional=True, proj_size=32)
    model = nn.ModuleDict({"lstm": lstm})
    mats, skipped = find_layers(model, min_evals=8)
    assert skipped == []
    assert [m.name for m in mats] == _expected_names("lstm", _keys(2, True, proj=True), LSTM_GATES)
    assert len(mats) == 4 * (4 + 4 + 1)
    by = {m.name: m for m in mats}
    # gate of weight_ih_l0: H x in = 64 x 48; of weight_hh: H x proj = 64 x 32 (stored so)
    assert by["lstm.weight_ih_l0.i"].shape == (64, 48) and (
        by["lstm.weight_ih_l0.i"].N,
        by["lstm.weight_ih_l0.i"].M,
    ) == (64, 48)
    assert by["lstm.weight_hh_l0_reverse.f"].shape == (64, 32)
    # layer 1 reads both directions' projected outputs: in = 2 * proj_size = 64
    assert by["lstm.weight_ih_l1.g"].shape == (64, 64)
    # the projection (proj x H = 32 x 64) is its own matrix, oriented (transposed view)
    hr = by["lstm.weight_hr_l1_reverse"]
    assert hr.shape == (32, 64) and (hr.N, hr.M) == (64, 32) and hr.stored_transposed
    assert by["lstm.weight_hh_l1.o"].param_name == "lstm.weight_hh_l1"
    _check_gates(mats, lstm, "lstm", LSTM_GATES)


def test_bidirectional_two_layer_gru_and_rnn():
    torch.manual_seed(1)
    model = nn.Module()
    model.gru = nn.GRU(40, 56, num_layers=2, bidirectional=True)
    model.rnn = nn.RNN(100, 60, num_layers=2, bidirectional=True, nonlinearity="relu")
    mats, skipped = find_layers(model, min_evals=8)
    assert skipped == []
    gru = [m for m in mats if m.name.startswith("gru.")]
    rnn = [m for m in mats if m.name.startswith("rnn.")]
    assert [m.name for m in gru] == _expected_names("gru", _keys(2, True), GRU_GATES)
    assert [m.name for m in rnn] == _expected_names("rnn", _keys(2, True), ())  # one gate: not split
    assert {m.name: (m.N, m.M) for m in gru if m.name.endswith(".z")} == {
        "gru.weight_ih_l0.z": (56, 40),
        "gru.weight_hh_l0.z": (56, 56),
        "gru.weight_ih_l0_reverse.z": (56, 40),
        "gru.weight_hh_l0_reverse.z": (56, 56),
        "gru.weight_ih_l1.z": (112, 56),  # stored (56, 112): transposed view
        "gru.weight_hh_l1.z": (56, 56),
        "gru.weight_ih_l1_reverse.z": (112, 56),
        "gru.weight_hh_l1_reverse.z": (56, 56),
    }
    assert {m.name: (m.N, m.M) for m in rnn}["rnn.weight_ih_l0"] == (100, 60)
    _check_gates(gru, model.gru, "gru", GRU_GATES)
    _check_gates(rnn, model.rnn, "rnn", ())


def test_cells():
    torch.manual_seed(2)
    model = nn.Module()
    model.lc = nn.LSTMCell(50, 70)
    model.gc = nn.GRUCell(60, 60)
    model.rc = nn.RNNCell(30, 64)
    mats, skipped = find_layers(model, min_evals=8)
    assert skipped == []
    assert [m.name for m in mats] == (
        [f"lc.weight_{w}.{g}" for w in ("ih", "hh") for g in LSTM_GATES]
        + [f"gc.weight_{w}.{g}" for w in ("ih", "hh") for g in GRU_GATES]
        + ["rc.weight_ih", "rc.weight_hh"]
    )
    assert [m.module_type for m in mats][::4] == ["LSTMCell", "LSTMCell", "GRUCell", "GRUCell"]
    _check_gates(mats[:8], model.lc, "lc", LSTM_GATES)
    _check_gates(mats[8:14], model.gc, "gc", GRU_GATES)
    _check_gates(mats[14:], model.rc, "rc", ())


def test_state_dict_gives_the_same_matrices():
    torch.manual_seed(3)
    model = nn.Module()
    model.lstm = nn.LSTM(48, 64, num_layers=2, bidirectional=True, proj_size=32)
    model.plain = nn.LSTM(24, 40)
    model.gru = nn.GRU(40, 56, num_layers=2)
    model.rnn = nn.RNN(30, 60)
    model.cell = nn.LSTMCell(20, 30)
    model.gcell = nn.GRUCell(20, 30)
    model.head = nn.Linear(56, 10)
    mats, skipped = find_layers(model, min_evals=8)
    sd = model.state_dict()
    sd_mats, sd_skipped = find_layers(sd, min_evals=8)
    assert [(m.name, m.kind, m.N, m.M, m.shape, m.param_name) for m in sd_mats if m.kind == "recurrent"] == [
        (m.name, m.kind, m.N, m.M, m.shape, m.param_name) for m in mats if m.kind == "recurrent"
    ]
    assert [m.name for m in sd_mats if m.kind != "recurrent"] == ["head"]
    assert [(s.name, s.reason) for s in sd_skipped] == [(s.name, s.reason) for s in skipped]
    for m in sd_mats:
        assert m.module_type == "tensor" and _is_view_of(m.weight, sd[m.param_name])
    assert find_layers(sd, types="recurrent", include="gcell.*")[0] == []  # every gate has M < min_evals=50
    assert {s.name for s in find_layers(sd, types="recurrent", include="gcell.*")[1]} == {
        f"gcell.weight_{w}.{g}" for w in ("ih", "hh") for g in GRU_GATES
    }


def test_types_include_exclude():
    torch.manual_seed(4)
    model = nn.Module()
    model.embed = nn.Embedding(100, 48)
    model.lstm = nn.LSTM(48, 64, bidirectional=True)
    model.head = nn.Linear(128, 100)

    def names(**kw):
        return [m.name for m in find_layers(model, min_evals=8, **kw)[0]]

    rec = _expected_names("lstm", _keys(1, True), LSTM_GATES)
    assert names(types=["recurrent"]) == rec
    assert names(types="recurrent") == rec
    assert names(types=[nn.LSTM]) == rec
    assert names(types=["linear", "embedding"]) == ["embed", "head"]
    assert names(types=["recurrent", "linear"]) == rec + ["head"]
    assert names() == ["embed"] + rec + ["head"]
    # a gate matches through its packed parameter's key too (like mha.in_proj.q via mha.in_proj)
    assert names(include="lstm.weight_ih_l0") == [f"lstm.weight_ih_l0.{g}" for g in LSTM_GATES]
    assert names(include="lstm.*.f") == [f"lstm.{k}.f" for k in _keys(1, True)]
    assert names(types="recurrent", exclude="re:_reverse") == [n for n in rec if "_reverse" not in n]
    assert names(types="recurrent", exclude=["*.weight_hh_*", "re:\\.[fg]$"]) == [
        f"lstm.weight_ih_l0{s}.{g}" for s in ("", "_reverse") for g in ("i", "o")
    ]
    assert names(exclude="lstm.*") == ["embed", "head"]


def test_skips_with_reasons():
    torch.manual_seed(5)
    model = nn.Module()
    model.small = nn.GRU(12, 16)  # gates 16 x 12 and 16 x 16: M < 50
    model.lstm = nn.LSTM(64, 64)
    model.again = model.lstm  # registered twice: its weights are tied to the first name
    mats, skipped = find_layers(model)
    assert [m.name for m in mats] == _expected_names("lstm", _keys(1, False), LSTM_GATES)
    assert [(s.name, s.kind, s.reason) for s in skipped] == [
        *[("small.weight_ih_l0." + g, "recurrent", "M=12 < min_evals=50") for g in GRU_GATES],
        *[("small.weight_hh_l0." + g, "recurrent", "M=16 < min_evals=50") for g in GRU_GATES],
        ("again.weight_ih_l0", "recurrent", "tied to lstm.weight_ih_l0"),
        ("again.weight_hh_l0", "recurrent", "tied to lstm.weight_hh_l0"),
    ]
    assert skipped[0].shape == (16, 12)

    # a weight that is not 4 gates x hidden_size rows is listed, not mis-split
    odd = nn.LSTM(64, 64)
    odd.weight_hh_l0 = nn.Parameter(torch.randn(100, 64))
    mats, skipped = find_layers(odd)
    assert [m.name for m in mats] == [f"weight_ih_l0.{g}" for g in LSTM_GATES]
    assert [(s.name, s.reason) for s in skipped] == [
        ("weight_hh_l0", "weight (100, 64) is not 4 gates x hidden_size=64 rows")
    ]


def test_dynamically_quantized_lstm_is_listed_as_skipped():
    model = nn.Sequential(nn.LSTM(64, 64), nn.Linear(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
        q = quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    mats, skipped = find_layers(q)
    assert [m.name for m in mats] == ["1"]
    assert [(s.name, s.kind) for s in skipped] == [("0", "recurrent")]
    assert "quantized" in skipped[0].reason


# -------------------------------------------------------------------------- analysis


class Tagger(nn.Module):
    """A sequence model of adequate size: embedding, bidirectional LSTM with projection, GRU, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(200, 64)
        self.lstm = nn.LSTM(64, 96, num_layers=2, bidirectional=True, proj_size=64, batch_first=True)
        self.gru = nn.GRU(128, 64, batch_first=True)
        self.head = nn.Linear(64, 200)

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))
        h, _ = self.gru(h)
        return self.head(h)


def test_analyze_gives_one_report_per_gate_with_finite_alpha():
    torch.manual_seed(6)
    model = Tagger()
    rep = esdwatch.analyze(model, types=["recurrent"], traps=False)
    expected = _expected_names("lstm", _keys(2, True, proj=True), LSTM_GATES) + _expected_names(
        "gru", _keys(1, False), GRU_GATES
    )
    assert [r.name for r in rep.layers] == expected and rep.skipped == ()
    assert len(rep.layers) == 4 * 9 + 6
    for r in rep.layers:
        assert r.kind == "recurrent" and r.status == "ok"
        assert math.isfinite(r.alpha) and r.alpha > 1, (r.name, r.alpha)
        assert r.num_evals == r.M >= 64
    shapes = {r.name: (r.N, r.M) for r in rep.layers}
    assert shapes["lstm.weight_ih_l0.i"] == (96, 64) and shapes["lstm.weight_ih_l1.i"] == (128, 96)
    assert shapes["lstm.weight_hh_l0.o"] == (96, 64) and shapes["lstm.weight_hr_l0"] == (96, 64)
    assert shapes["gru.weight_ih_l0.n"] == (128, 64) and shapes["gru.weight_hh_l0.r"] == (64, 64)
    # by default everything is analysed: recurrent gates next to the other layers
    full = esdwatch.analyze(model, traps=False, mp_fit=False)
    assert [r.name for r in full.layers] == ["embed"] + expected + ["head"]


def test_monitor_plain_loop_records_gate_matrices(tmp_path):
    torch.manual_seed(7)
    model = nn.Module()
    model.gru = nn.GRU(12, 16, batch_first=True)
    model.head = nn.Linear(16, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, every_n_steps=2, log_dir=tmp_path, on_backpressure="block", min_evals=8, traps=False) as mon:
        for step in range(1, 5):
            x = torch.randn(8, 5, 12)
            h, _ = model.gru(x)
            loss = model.head(h[:, -1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step)
    gates = _expected_names("gru", _keys(1, False), GRU_GATES)
    records = read_records(tmp_path)
    steps = sorted({r.global_step for r in records})
    assert steps == [2, 4]
    for s in steps:
        got = [r for r in records if r.global_step == s]
        assert [r.name for r in got] == gates + ["head"]
        assert all(r.report.kind == "recurrent" for r in got[:6])
        assert [(r.report.N, r.report.M) for r in got[:6]] == [(16, 12)] * 3 + [(16, 16)] * 3
        assert all(r.report.status == "ok" for r in got)
