"""The ``esdwatch`` command: ``esdwatch analyze TARGET`` and ``esdwatch report LOG_DIR``."""

from __future__ import annotations

from esdwatch.cli.main import main

__all__ = ["main"]
