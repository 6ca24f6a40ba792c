"""``esdwatch config [NAME]``: the LightningCLI configs shipped inside the package.

The YAML files live in ``esdwatch/configs/`` (package data, so a pip install has them;
the repository's ``configs/`` points there). ``esdwatch config`` lists them,
``esdwatch config NAME`` prints one, ``esdwatch config --script`` prints the
``LightningCLI(...)`` script they assume.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["CLI_SCRIPT", "ConfigError", "config_names", "config_text", "describe_configs"]

#: The LightningCLI entry point the shipped configs assume (``esdwatch config --script``).
CLI_SCRIPT = '''\
"""LightningCLI entry point for the esdwatch configs.

    esdwatch config live_dashboard > live_dashboard.yaml
    python cli.py fit --config live_dashboard.yaml

DigitsMLP and DigitsDataModule are esdwatch's demo model and data (pip install
"esdwatch[demo]"); put your own LightningModule and LightningDataModule in their place.
With pytorch_lightning, import LightningCLI from pytorch_lightning.cli instead.
"""

from lightning.pytorch.cli import LightningCLI

from esdwatch.demo import DigitsDataModule, DigitsMLP

if __name__ == "__main__":
    LightningCLI(DigitsMLP, DigitsDataModule)
'''


class ConfigError(ValueError):
    """An unknown config name (message is user-facing)."""


def _folder() -> Any:  # a Traversable (importlib.abc until 3.11, importlib.resources.abc after)
    return resources.files("esdwatch").joinpath("configs")


def config_names() -> list[str]:
    """The names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(f.name[: -len(".yaml")] for f in _folder().iterdir() if f.name.endswith(".yaml"))


def config_text(name: str) -> str:
    """The YAML text of the shipped config ``name`` (``.yaml`` optional)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = config_names()
    if stem not in names:
        raise ConfigError(f"There is no config named {name!r}; the shipped configs are: {', '.join(names)}.")
    return _folder().joinpath(stem + ".yaml").read_text(encoding="utf-8")


def _title(text: str) -> str:
    """The first comment line of a config, without its ``#``."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def describe_configs() -> str:
    """The listing printed by ``esdwatch config``."""
    names = config_names()
    width = max(len(n) for n in names)
    lines = ["LightningCLI configs shipped with esdwatch:", ""]
    lines += [f"  {n.ljust(width)}  {_title(config_text(n))}" for n in names]
    lines += [
        "",
        "Print one with 'esdwatch config NAME > NAME.yaml' and the LightningCLI script they assume with",
        "'esdwatch config --script > cli.py', then run 'python cli.py fit --config NAME.yaml'.",
    ]
    return "\n".join(lines)
