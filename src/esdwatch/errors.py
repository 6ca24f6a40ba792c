"""The two exception types esdwatch raises or warns with."""

from __future__ import annotations

__all__ = ["EsdwatchError", "EsdwatchWarning"]


class EsdwatchError(RuntimeError):
    """An analysis, sink or alarm-action failure re-raised on the training thread (``strict=True``)."""


class EsdwatchWarning(UserWarning):
    """Something the user should fix, that does not stop training."""
