"""The end-of-run summary a user reads in the terminal: one table and a few lines.

:func:`layer_table` is the last snapshot's layers (shape, phase, alpha ± its standard error,
the best tail law when fit="TPL"/"E_TPL" ran, entropy, stable
rank, MP soft rank, the alarm kinds fired on the layer, status); :func:`run_summary` adds
the snapshots taken and skipped, the alarms by kind with their layers, the matrices that
were found but not analysed (and why) and where the records are. The monitor prints it
when training ends (``verbose=True``, the default); the demo prints the same table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from esdwatch.schema import Alarm, LayerRecord, SkippedLayer

__all__ = ["fmt", "layer_table", "run_summary"]

TABLE_HEADER = ("layer", "shape", "phase", "alpha", "entropy", "stable_rank", "mp_softrank", "alarms", "status")


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``-`` when missing or not finite."""
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def _alpha(alpha: float, sigma: float) -> str:
    """alpha with its standard error, ``2.46±0.16`` (alpha alone when sigma is missing)."""
    text = fmt(alpha, 2)
    return text if text == "-" or fmt(sigma) == "-" else f"{text}\u00b1{fmt(sigma, 2)}"


def _alarm_kinds(alarms: Iterable[Alarm]) -> dict[str, list[str]]:
    by_layer: dict[str, list[str]] = defaultdict(list)
    for a in alarms:
        if a.kind not in by_layer[a.layer]:
            by_layer[a.layer].append(a.kind)
    return by_layer


def layer_table(records: Sequence[LayerRecord], alarms: Iterable[Alarm] | None = None) -> str:
    """A fixed-width table of one snapshot's records, one row per layer (see the module docstring).

    With ``alarms`` (even empty), a column lists the alarm kinds fired on each layer.
    """
    kinds = None if alarms is None else _alarm_kinds(alarms)
    header = TABLE_HEADER if kinds is not None else tuple(h for h in TABLE_HEADER if h != "alarms")
    best_fit = any(r.report.best_fit for r in records)  # fit="TPL"/"E_TPL" ran
    if best_fit:
        header = (*header[:4], "best_fit", *header[4:])
    rows: list[tuple[str, ...]] = [header]
    for r in records:
        rep = r.report
        row = [
            rep.name,
            f"{rep.N}x{rep.M}",
            rep.phase,
            _alpha(rep.alpha, rep.alpha_sigma),
            *([rep.best_fit or "-"] if best_fit else []),
            fmt(rep.entropy, 3),
            fmt(rep.stable_rank, 1),
            fmt(rep.mp_softrank, 3),
        ]
        if kinds is not None:
            row.append(",".join(kinds.get(rep.name, [])) or "-")
        rows.append((*row, rep.status))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _advice_lines(alarms: Sequence[Alarm]) -> list[str]:
    """The first warning-or-worse alarm of each kind, with why and what to do (info alarms: none)."""
    out: list[str] = []
    seen: set[str] = set()
    for a in alarms:
        if a.severity == "info" or a.kind in seen:
            continue
        seen.add(a.kind)
        out.append(f"  [{a.kind}] step {a.step}: {a.message}" + (f"\n    advice: {a.advice}" if a.advice else ""))
    return out


def run_summary(
    records: Sequence[LayerRecord],
    alarms: Sequence[Alarm],
    *,
    snapshots: int,
    skipped: int,
    skipped_steps: Sequence[int],
    skipped_layers: Sequence[SkippedLayer] = (),
    records_path: Any = None,
    failures: dict[tuple[str, str], int] | None = None,
) -> str:
    """The whole end-of-run summary (see the module docstring)."""
    last = max((r.global_step for r in records), default=None)
    first = min((r.global_step for r in records), default=None)
    if first is not None and first != last:  # a rotating subset per snapshot: each layer's latest values
        last = f"{last} (each layer as of its latest snapshot, steps {first} to {last})"  # type: ignore[assignment]
    lines = [
        f"esdwatch: {snapshots} snapshot(s) analysed"
        + (
            f", {skipped} skipped (steps {_steps(skipped_steps)}; reasons in skipped_snapshots.jsonl)"
            if skipped
            else ""
        )
        + (f"; the last at step {last}:" if last is not None else "; no snapshot was analysed.")
    ]
    if records:
        lines.append(layer_table(records, alarms))
    by_kind: dict[str, list[str]] = defaultdict(list)
    for a in alarms:
        if a.layer not in by_kind[a.kind]:
            by_kind[a.kind].append(a.layer)
    if by_kind:
        count = {k: sum(a.kind == k for a in alarms) for k in by_kind}
        lines.append(
            "alarms: "
            + "; ".join(
                f"{k} x{count[k]} ({', '.join(v[:6])}{' ...' if len(v) > 6 else ''})" for k, v in by_kind.items()
            )
        )
        lines.extend(_advice_lines(alarms))
    else:
        lines.append("alarms: none")
    if skipped_layers:
        shown = "; ".join(f"{s.name} ({s.reason})" for s in skipped_layers[:8])
        lines.append(
            f"not analysed: {shown}" + (f" and {len(skipped_layers) - 8} more" if len(skipped_layers) > 8 else "")
        )
    for (layer, error), n_failed in (failures or {}).items():
        lines.append(f"failed: {layer} at {n_failed} snapshot(s): {error}")
    if records_path is not None:
        lines.append(f"records: {records_path}")
    return "\n".join(lines)


def _steps(steps: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:10])
    return shown + (f" and {len(steps) - 10} more" if len(steps) > 10 else "")
