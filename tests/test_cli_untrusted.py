"""Untrusted input to the `esdwatch` command (issue 14, item 8): it never runs code from a
checkpoint or a model directory, never prompts, and refuses every bad input with exit
status 2 and one whole sentence on stderr, without terminal escape codes.

Each case runs the real command (`python -m esdwatch`) in a subprocess with stdin closed,
on real files: a Hugging Face directory written by transformers whose config.json asks
for its own code (auto_map) in a Python file that writes a marker when executed, a
pickled nn.Module, a text file, a factory that exits, and a Lightning checkpoint given to
`esdwatch report`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from esdwatch.cli import main
from esdwatch.cli.loading import plain_text
from esdwatch.rundir import is_jsonl, read_records

ROOT = Path(__file__).resolve().parents[1]

EVIL_CODE = """\
import pathlib

pathlib.Path({marker!r}).write_text("the model directory's code ran")

from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = {model_type!r}


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def _env(tmp_path: Path, *extra_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *map(str, extra_path), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")  # where transformers would copy remote code
    env["NO_COLOR"] = "1"
    return env


def _esdwatch(tmp_path: Path, *args: str, extra_path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "esdwatch", *args],
        stdin=subprocess.DEVNULL,  # a prompt would read EOF (and the test would see it), never hang
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(tmp_path, *extra_path),
        cwd=tmp_path,
    )


def _one_sentence(proc: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command, checked to be one plain sentence."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("esdwatch: error: ") and line.endswith("."), line
    assert "\x1b" not in proc.stderr and "Traceback" not in proc.stderr
    return line


def _hf_directory(tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """A tiny BERT saved by transformers, whose config asks for the code in evil_code.py."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    directory, marker = tmp_path / "model", tmp_path / "MARKER"
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=100
    )
    config.auto_map = {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"}
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    data = json.loads((directory / "config.json").read_text())
    data["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(data))
    (directory / "evil_code.py").write_text(EVIL_CODE.format(marker=str(marker), model_type=model_type))
    return directory, marker


# "esdwatch-evil": a type transformers does not know, which makes it ask on a terminal;
# "bert": a known type, where transformers may pick either the built-in class or the code
@pytest.mark.parametrize("model_type", ["esdwatch-evil", "bert"])
def test_hf_directory_asking_for_its_own_code_is_refused_without_running_it(tmp_path, model_type):
    directory, marker = _hf_directory(tmp_path, model_type)
    proc = _esdwatch(tmp_path, "analyze", str(directory))
    line = _one_sentence(proc)
    assert f"{directory} asks to run its own Python code (auto_map in config.json" in line
    assert "esdwatch never runs code from a model directory" in line
    assert f"run 'esdwatch analyze {directory / 'model.safetensors'}'" in line
    assert proc.stdout == ""  # no prompt, no table
    assert not marker.exists()
    assert not (tmp_path / "hf_home").exists()  # transformers never copied the code anywhere
    # what the message suggests works: the weights alone, read as data
    assert main(["analyze", str(directory / "model.safetensors"), "--format", "json"]) == 0
    assert not marker.exists()


def test_the_marker_fixture_is_armed(tmp_path):
    """Guards the test above: loading the same directory with trust_remote_code=True does
    run its code and write the marker, so its absence above means esdwatch refused."""
    directory, marker = _hf_directory(tmp_path, "esdwatch-evil")
    script = (
        f"from transformers import AutoModel; AutoModel.from_pretrained({str(directory)!r}, trust_remote_code=True)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()


def test_plain_hf_directory_loads_with_trust_remote_code_false(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    directory, _ = _hf_directory(tmp_path, "bert")
    data = json.loads((directory / "config.json").read_text())
    del data["auto_map"]
    (directory / "config.json").write_text(json.dumps(data))
    calls = []
    original = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    assert main(["analyze", str(directory), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) > 0
    assert calls and all(c.get("trust_remote_code") is False for c in calls)


def test_pickled_module_refusal_is_one_plain_sentence(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(3, 3), path)  # the whole module pickled: weights_only refuses it
    line = _one_sentence(_esdwatch(tmp_path, "analyze", str(path)))
    assert f"{path} holds a pickled torch.nn.modules.linear.Linear object" in line
    assert "torch.save(model.state_dict(), PATH)" in line and "package.module:factory" in line


def test_text_file_names_the_file_and_what_was_expected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("epoch,loss\n1,0.5\n")
    line = _one_sentence(_esdwatch(tmp_path, "analyze", str(path)))
    assert line == (
        f"esdwatch: error: {path} is a text file, not a model: expected a Lightning .ckpt, a torch.save() state "
        "dict (.pt, .pth, .bin), a .safetensors file, a Hugging Face model directory or package.module:factory."
    )


def test_factory_raising_system_exit_is_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "exiting_factory.py").write_text("def build():\n    raise SystemExit(0)\n")
    line = _one_sentence(_esdwatch(tmp_path, "analyze", "exiting_factory:build", extra_path=(tmp_path,)))
    assert line == (
        "esdwatch: error: Calling exiting_factory:build raised SystemExit(0) instead of returning a model: "
        "pass a zero-argument function that returns an nn.Module or a state dict."
    )
    # a module that exits while it is imported (a script), in-process
    (tmp_path / "exiting_module.py").write_text("import sys\n\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "exiting_module:model"]) == 2
    assert capsys.readouterr().err == (
        "esdwatch: error: Importing 'exiting_module' raised SystemExit(0), so it cannot provide a model: "
        "name a module that defines the model without exiting.\n"
    )


def test_report_refuses_a_file_that_is_not_json_lines(tmp_path, capsys):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"epoch": 3, "global_step": 300, "state_dict": nn.Linear(200, 300).state_dict()}, ckpt)
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(300)))
    expected = (
        "esdwatch: error: {} is not an esdwatch records file (JSON lines, one record per line): pass a run's log "
        "directory, its esdwatch/ directory or its records.jsonl."
    )
    proc = _esdwatch(tmp_path, "report", str(ckpt))
    assert _one_sentence(proc) == expected.format(ckpt)
    assert proc.stdout == ""
    # a text file of many lines, in-process: one sentence, no warning per line
    assert main(["report", str(csv)]) == 2
    assert capsys.readouterr().err == expected.format(csv) + "\n"


def test_is_jsonl(tmp_path):
    cases = {
        "empty": b"",
        "records": b'{"a": 1}\n{"b": 2}\n',
        "torn_first_write": b'{"global_step": 0, "na',
        "text": b"step,loss\n1,2\n",
        "json_array_line": b"[1, 2]\n",
        "binary": b"PK\x03\x04\x00\x00",
    }
    result = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        result[name] = is_jsonl(tmp_path / name)
    assert result == {
        "empty": True,
        "records": True,
        "torn_first_write": True,
        "text": False,
        "json_array_line": False,
        "binary": False,
    }


def test_invalid_lines_warn_once_per_file(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    path.write_text('{"x": 1}\n' + "garbage\n" * 50 + '{"y": 2}\n')
    with caplog.at_level(logging.WARNING, logger="esdwatch.rundir"):
        assert read_records(path) == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # the bad JSON lines, then the lines that are not records
    assert "line 2 is not valid JSON, skipped (and 49 more such lines)" in messages[0]
    assert "line 1 is not a record" in messages[1] and "(and 1 more such line)" in messages[1]


def test_plain_text_strips_escape_codes_and_keeps_whole_sentences():
    raw = "Weights only load failed. This file can still be loaded, \x1b[1mdo those steps\x1b[0m.\n\t(1) more"
    assert plain_text(raw) == "Weights only load failed"
    assert plain_text("\x1b[31mred\x1b[0m text   here") == "red text here"
    long = "word " * 100
    cut = plain_text(long, limit=40)
    assert cut.endswith(" ...") and len(cut) <= 44 and "wor ..." not in cut
