"""The progress bar of long ``esdwatch analyze`` runs (tqdm), quiet when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(enabled: bool | None = None, stream: Any = None) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar of matrices done and time left.

    ``enabled=None`` draws it only when ``stream`` (default stderr) is a terminal, so logs
    and pipes stay clean; without tqdm installed the callback does nothing.
    """
    stream = sys.stderr if stream is None else stream
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        yield lambda done, total: None
        return
    bar = tqdm(total=0, unit="matrix", desc="esdwatch analyze", file=stream, dynamic_ncols=True, leave=False)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
