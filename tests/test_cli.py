"""`esdwatch analyze TARGET` on every kind of target, and its clean failures."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from esdwatch.cli import main


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 160), nn.ReLU(), nn.Linear(160, 90))


def factory():
    """Zero-argument factory used through the 'module:attribute' target form."""
    return _model()


MODEL = _model()


def test_state_dict_file_table(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(_model().state_dict(), path)
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 analyzed matrices" in out
    for col in ("alpha", "entropy", "mp_softrank", "phase", "num_traps"):
        assert col in out.splitlines()[1]
    assert "<alpha>" in out


def test_table_says_which_layers_took_the_tail_path(tmp_path, capsys):
    from esdwatch.engine.synthetic import power_law_spikes

    path = tmp_path / "w.pt"
    torch.save({"big.weight": power_law_spikes(2048, 2048, num_spikes=60, dtype=torch.float32)}, path)
    assert main(["analyze", str(path), "--spectrum", "tail", "--no-traps"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[1:4]
    assert header.split()[-2:] == ["spectrum", "status"] and row.split()[-2:] == ["tail", "ok"]
    assert "spectrum=tail:" in out and "estimates from its bulk quadrature: entropy, mp_softrank" in out
    # every value exact: no spectrum column, no note
    assert main(["analyze", str(path), "--no-traps"]) == 0
    out = capsys.readouterr().out
    assert "spectrum" not in out.splitlines()[1] and "spectrum=tail" not in out


def test_lightning_style_checkpoint_json(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    sd = {f"model.{k}": v for k, v in _model().state_dict().items()}
    torch.save({"epoch": 3, "global_step": 30, "state_dict": sd}, path)
    assert main(["analyze", str(path), "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [l["name"] for l in payload["layers"]] == ["model.0", "model.2"]
    assert set(payload) >= {"layers", "skipped", "summary", "alarms"}


def test_safetensors_csv_to_file(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    out_file = tmp_path / "out.csv"
    assert main(["analyze", str(path), "--format", "csv", "--output", str(out_file)]) == 0
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("name,kind,N,M") and len(lines) == 3


def test_module_attribute_targets(capsys):
    assert main(["analyze", "tests.test_cli:factory", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 2
    assert main(["analyze", "tests.test_cli:MODEL", "--format", "json", "--layers", "2"]) == 0
    assert [l["name"] for l in json.loads(capsys.readouterr().out)["layers"]] == ["2"]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_text("this is not a model"),
        lambda p: torch.save({"lr": 0.1, "epochs": 3}, p),
        lambda p: torch.save(nn.Linear(3, 3), p),  # a pickled module: refused by weights_only
    ],
    ids=["text", "no-tensors", "pickled-module"],
)
def test_bad_files_one_line_error_exit_2(tmp_path, make):
    path = tmp_path / "bad.pt"
    make(path)
    proc = subprocess.run(
        [sys.executable, "-m", "esdwatch", "analyze", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esdwatch: error:")
    assert "Traceback" not in proc.stderr


def test_missing_target_and_bad_reference(capsys):
    assert main(["analyze", "/nonexistent/file.pt"]) == 2
    assert main(["analyze", "no_such_module_xyz:model"]) == 2
    assert main(["analyze", "tests.test_cli:nothing_here"]) == 2
    err = capsys.readouterr().err
    assert err.count("esdwatch: error:") == 3


def test_directory_without_config(tmp_path):
    assert main(["analyze", str(tmp_path)]) == 2


def test_spectrum_option_and_quiet_progress(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(_model().state_dict(), path)
    assert main(["analyze", str(path), "--spectrum", "tail", "--format", "json", "--no-traps"]) == 0
    captured = capsys.readouterr()
    layers = json.loads(captured.out)["layers"]
    assert {layer["spectrum"] for layer in layers} <= {"exact", "tail"} and len(layers) == 2
    assert "matrix" not in captured.err  # stderr is not a terminal: no bar
    with pytest.raises(SystemExit):
        main(["analyze", str(path), "--spectrum", "fast"])


def test_progress_bar_draws_on_a_terminal():
    import io

    from esdwatch.cli.progress import progress_bar

    stream = io.StringIO()
    with progress_bar(enabled=True, stream=stream) as progress:
        progress(1, 3)
        progress(3, 3)
    assert "/3 [" in stream.getvalue() and "matrix" in stream.getvalue()
    quiet = io.StringIO()
    with progress_bar(stream=quiet) as progress:  # StringIO is not a terminal
        progress(1, 1)
    assert quiet.getvalue() == ""
