"""Architecture checks: size limits for the monitor, the import-linter contracts in
pyproject.toml, and the two import rules import-linter cannot state."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "esdwatch"


def _load_code_size():
    spec = importlib.util.spec_from_file_location("code_size", ROOT / "tools" / "code_size.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building Item
    spec.loader.exec_module(module)
    return module


def test_monitor_size_limits(capsys):
    """No class under esdwatch/monitor over 400 lines, no function or method over 50."""
    code_size = _load_code_size()
    rc = code_size.main(
        [str(PKG), "--check", "--max-class", "400", "--max-method", "50", "--under", str(PKG / "monitor")]
    )
    if rc != 0:
        pytest.fail(capsys.readouterr().out, pytrace=False)


def test_import_contracts():
    """`lint-imports` keeps every contract in pyproject.toml ([tool.importlinter])."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip(f"lint-imports is not installed next to {sys.executable} (pip install import-linter)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [str(exe), "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(proc.stdout + proc.stderr, pytrace=False)


def _imports(path: Path):
    """(line, imported module name) for every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def test_engine_imports_no_torch_tensorboard():
    """import-linter sees external packages only by their top-level name (torch), so it cannot
    forbid torch.utils.tensorboard; the engine must not import it."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path in sorted((PKG / "engine").rglob("*.py"))
        for line, name in _imports(path)
        if name == "torch.utils.tensorboard" or name.startswith("torch.utils.tensorboard.")
    ]
    assert not bad, bad


def test_package_does_not_import_its_facade():
    """`esdwatch/__init__.py` is a lazy facade for users: code inside the package imports the
    defining module (esdwatch.engine.analyzer ...), never `esdwatch` itself. import-linter cannot
    put the root package in a layer, so this is checked here."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "esdwatch":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from esdwatch import ...")
            elif isinstance(node, ast.Import) and any(a.name == "esdwatch" for a in node.names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} import esdwatch")
    assert not bad, bad
