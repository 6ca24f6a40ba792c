"""The package a pip user gets (issue 14, item 11): `esdwatch --version`, the license in
its SPDX form and in the wheel, the LightningCLI configs shipped as package data with
`esdwatch config` to print them and the script they assume, and the extras."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import esdwatch
from esdwatch.cli import main
from esdwatch.cli.configs import CLI_SCRIPT, config_names, config_text

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONFIGS = ("esdwatch", "live_dashboard", "long_run_guard")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def test_version_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "esdwatch", "--version"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"esdwatch {PYPROJECT['project']['version']}"
    assert esdwatch.__version__ == PYPROJECT["project"]["version"]


def test_license_metadata_is_spdx():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))  # PEP 639: not both
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # setuptools reads SPDX license strings and license-files from 77 on
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]


def test_demo_extra_is_in_all():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(req.startswith("scikit-learn") for req in extras["demo"])
    assert any("lightning" in req for req in extras["demo"])
    assert any("demo" in req for req in extras["all"] if req.startswith("esdwatch["))


def test_shipped_configs_are_the_repository_configs(capsys):
    assert config_names() == sorted(CONFIGS)
    for name in CONFIGS:
        # tests/test_configs.py trains with ROOT/configs/*.yaml: the same files
        assert config_text(name) == (ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
        assert main(["config", name]) == 0
        assert capsys.readouterr().out == config_text(name)
    assert main(["config"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name}  " in listing for name in CONFIGS) and "esdwatch config --script" in listing
    assert main(["config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "esdwatch: error: There is no config named 'nope'; the shipped configs are: "
        "esdwatch, live_dashboard, long_run_guard.\n"
    )


def test_printed_script_trains_with_a_printed_config(tmp_path, monkeypatch, capsys):
    """What a pip user does: print the script and a config, run `python cli.py fit --config ...`."""
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    from esdwatch.rundir import read_records

    assert main(["config", "--script"]) == 0
    (tmp_path / "cli.py").write_text(capsys.readouterr().out)
    assert (tmp_path / "cli.py").read_text() == CLI_SCRIPT
    assert main(["config", "esdwatch"]) == 0
    (tmp_path / "esdwatch.yaml").write_text(capsys.readouterr().out)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "cli.py",
            "fit",
            "--config=esdwatch.yaml",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks.init_args.every_n_steps=2",
            "--trainer.callbacks.init_args.execution.on_backpressure=block",
            "--model.hidden=[64, 64]",
            "--data.batch_size=32",
        ],
    )
    runpy.run_path(str(tmp_path / "cli.py"), run_name="__main__")
    steps = {r.global_step for r in read_records(tmp_path / "esdwatch")}
    assert steps == {0, 2}  # at_start baseline and the scheduled step 2


def test_wheel_holds_license_and_configs(tmp_path):
    """A real, non-editable wheel build (setuptools from this environment, no network)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build PEP 639 license metadata")
    src = tmp_path / "src_copy"  # a clean copy: no stale build/ of the checkout gets in
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("esdwatch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {f"esdwatch/configs/{name}.yaml" for name in CONFIGS} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Provides-Extra: demo" in metadata
