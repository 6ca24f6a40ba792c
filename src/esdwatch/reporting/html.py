"""``esdwatch report LOG_DIR``: a static HTML page of a run's records, with PNG figures.

Reads ``records.jsonl`` (and ``alarms.jsonl``, and ``spectra.jsonl`` when the run wrote
one) with the readers of :mod:`esdwatch.rundir`, so a run that is still training
(a half-written last line) or was interrupted and resumed (superseded run segments)
reads exactly as the monitor's own history. Writes into ``--output`` (default
``<records dir>/report/``):

* ``index.html``: the run at a glance (snapshots, steps, layers), the model averages
  and the per-layer table of the latest snapshot, the phase map, the alpha / entropy /
  MP soft-rank trajectories per layer, each layer's ESD at its first and last snapshot,
  and the alarm list. Plain HTML and inline CSS: no script, no network; with
  ``--embed`` the figures are inlined as data URIs and the page is a single file;
* ``phase_map.png``, ``alpha.png``, ``entropy.png``, ``mp_softrank.png``,
  ``esd_NNN_<layer>.png``.

Every file is written to a temporary name and renamed into place, so the report can be
regenerated while a browser shows it. The ESD panels draw the histogram of
``spectra.jsonl`` (written next to the records by the monitor when ``keep_evals=True``,
:class:`~esdwatch.sinks.spectra.SpectraSink`); without it they show the fitted MP and
power-law curves only.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

from esdwatch.rundir import (
    ALARMS_FILE,
    RECORDS_FILE,
    RUN_SUBDIR,
    find_file,
    is_jsonl,
    read_alarms,
    read_records,
    read_spectra,
)
from esdwatch.schema import SUMMARY_METRICS, Alarm, LatestRecords, LayerRecord, phase_name, summarize

__all__ = ["ReportError", "find_records", "build_report", "REPORT_FILE"]

REPORT_FILE = "index.html"
TRAJECTORY_METRICS: tuple[str, ...] = ("alpha", "entropy", "mp_softrank")


class ReportError(Exception):
    """A user error (no records where the report was asked for); one line for the CLI."""


def find_records(path: str | os.PathLike) -> Path:
    """The ``records.jsonl`` for ``path``: that file, or the one in the directory, in its
    ``esdwatch/`` sub-directory, or the only one anywhere below it."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such file or directory.")
    here = find_file(p, RECORDS_FILE)
    if here is not None and here.is_file():
        return _checked(here)
    found = sorted(p.rglob(RECORDS_FILE))
    if len(found) == 1:
        return _checked(found[0])
    if not found:
        raise ReportError(f"{p}: no records.jsonl in this directory or below it, so it is not an esdwatch log_dir.")
    listing = ", ".join(str(f.parent) for f in found[:5]) + (" ..." if len(found) > 5 else "")
    raise ReportError(f"{p}: {len(found)} runs below this directory; pass one of them: {listing}.")


def _checked(records: Path) -> Path:
    """``records`` if it is a JSON-lines file (:func:`~esdwatch.rundir.is_jsonl`), else a ReportError."""
    try:
        ok = is_jsonl(records)
    except OSError as exc:
        raise ReportError(f"{records} cannot be read ({exc.strerror or exc}).") from None
    if not ok:
        raise ReportError(
            f"{records} is not an esdwatch records file (JSON lines, one record per line): pass a run's log "
            f"directory, its {RUN_SUBDIR}/ directory or its {RECORDS_FILE}."
        )
    return records


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str = ".3f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "&ndash;"
    if not math.isfinite(v):
        return "&ndash;"
    return format(v, spec)


def _marked(report: Any, field: str, cell: str) -> str:
    """``cell`` marked as an estimate when ``field`` is one in ``report`` (the tail path's
    bulk metrics: esdwatch.engine.tail), else as it is."""
    if field not in report.estimated_fields:
        return cell
    return f"<span title='estimate (tail path)'>&asymp;&nbsp;{cell}</span>"


def _count(value: Any) -> str:
    return "&ndash;" if value is None or (isinstance(value, (int, float)) and value < 0) else _esc(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "layer"


def _when(wall_time: float) -> str:
    if not wall_time or wall_time <= 0:
        return "&ndash;"
    return _dt.datetime.fromtimestamp(wall_time, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Writer:
    """Writes files atomically into ``out``; collects the images the page references."""

    def __init__(self, out: Path, embed: bool) -> None:
        self.out = out
        self.embed = embed
        self.files: list[str] = []

    def png(self, fig, filename: str) -> str:
        """Save ``fig`` as ``filename``; the ``src`` to use in the page."""
        from esdwatch.reporting.figures import save_png

        target = self.out / filename
        tmp = target.with_name(f".{filename}.tmp")
        save_png(fig, tmp)
        os.replace(tmp, target)
        self.files.append(filename)
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(target.read_bytes()).decode("ascii")
        return filename

    def text(self, filename: str, content: str) -> Path:
        target = self.out / filename
        tmp = target.with_name(f".{filename}.tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, target)
        return target


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} .note{background:#fff8e1;border:1px solid #f0d58c;padding:6px 10px;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafafa}
.chip{display:inline-block;width:10px;height:10px;border:1px solid #888;margin-right:5px;vertical-align:-1px}
img{max-width:100%;height:auto;border:1px solid #eee;margin:4px 0}
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid img{max-width:48%}
.sev-error td{color:#a50f15} .sev-info td{color:#555}
"""


def _sigma_cell(r: Any) -> str:
    """alpha's standard error (&plusmn;), and the bootstrap interval when there is one."""
    cell = f"&plusmn; {_num(r.alpha_sigma)}"
    if math.isfinite(r.alpha_ci_low):
        cell += f" <small>[{_num(r.alpha_ci_low)}, {_num(r.alpha_ci_high)}]</small>"
    return cell


def _phase_cell(phase: Any) -> str:
    from esdwatch.reporting.figures import PHASE_COLORS

    name = phase_name(phase)
    return f'<span class="chip" style="background:{PHASE_COLORS.get(name, "#d9d9d9")}"></span>{_esc(name)}'


def build_report(
    log_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    embed: bool = False,
    max_layers: int | None = 64,
) -> Path:
    """Write the HTML report of the run at ``log_dir``; returns the path of ``index.html``.

    ``log_dir``: a run's log directory, its ``esdwatch/`` directory or a ``records.jsonl``.
    ``output``: the report directory (default ``<records dir>/report``). ``embed``: inline
    the figures (a single self-contained file). ``max_layers``: ESD figures for at most
    this many layers (model order; None for all). Raises :class:`ReportError` when there
    are no records, ImportError when matplotlib is missing.
    """
    from esdwatch.reporting.figures import (
        esd_pair_figure,
        layer_order,
        phase_map_figure,
        require_matplotlib,
        trajectory_figure,
    )

    require_matplotlib()
    records_path = find_records(log_dir)
    records = read_records(records_path)
    if not records:
        raise ReportError(f"{records_path}: no records yet (the first snapshot has not been analysed).")
    alarms: list[Alarm] = read_alarms(records_path.parent) if (records_path.parent / ALARMS_FILE).exists() else []
    spectra = read_spectra(records_path.parent)
    out = Path(output) if output is not None else records_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out, embed)

    by_step: dict[int, list[LayerRecord]] = {}
    for rec in records:
        by_step.setdefault(rec.global_step, []).append(rec)
    steps = sorted(by_step)
    layers = layer_order([[r.name for r in by_step[s]] for s in steps])
    latest_step = steps[-1]
    by_layer = LatestRecords()  # each layer's latest record (a rotating subset per snapshot: not all in the last)
    for s in steps:
        latest = by_layer.update(by_step[s])
    first_step = min(r.global_step for r in latest)
    segments = sorted({r.segment for r in records})
    run_name = title or f"esdwatch report: {records_path.parent.parent.name or records_path.parent}"

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(run_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(run_name)}</h1>",
        f'<p class="meta">{len(steps)} snapshots, global steps {steps[0]} to {latest_step}; {len(layers)} layers; '
        f"run segments {', '.join(map(str, segments))}; last snapshot taken {_when(max(r.wall_time for r in latest))}. "
        f"Records: <code>{_esc(records_path)}</code>. Report generated "
        f"{_dt.datetime.now(tz=_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')} "
        "from the records written so far.</p>",
    ]

    # latest snapshot: model averages and per-layer table
    avg = summarize([r.report for r in latest], SUMMARY_METRICS)
    parts.append(
        f"<h2>Latest snapshot (step {latest_step})</h2>"
        if first_step == latest_step
        else f"<h2>Latest values (each layer as of its latest snapshot, steps {first_step} to {latest_step})</h2>"
    )
    parts.append(
        "<table><tr>"
        + "".join(f"<th>&lt;{_esc(k)}&gt;</th>" for k in avg)
        + "</tr><tr>"
        + "".join(f"<td>{_num(v)}</td>" for v in avg.values())
        + "</tr></table>"
    )
    head = (
        "<tr><th class='l'>layer</th><th class='l'>kind</th><th>N &times; M</th><th class='l'>phase</th>"
        "<th>alpha</th><th title='standard error; bootstrap 95% interval'>&plusmn; sigma</th>"
        "<th>D</th><th class='l'>best fit</th><th>alpha_weighted</th><th>entropy</th><th>MP soft rank</th>"
        "<th>stable rank</th><th>spikes</th><th>traps</th><th class='l'>status</th></tr>"
    )
    rows = []
    for rec in latest:
        r = rec.report
        cell = partial(_marked, r)
        rows.append(
            f"<tr><td class='l'>{_esc(r.name)}</td><td class='l'>{_esc(r.kind)}</td><td>{r.N} &times; {r.M}</td>"
            f"<td class='l'>{cell('phase', _phase_cell(r.phase))}</td><td>{_num(r.alpha)}</td>"
            f"<td>{_sigma_cell(r)}</td><td>{_num(r.D)}</td><td class='l'>{_esc(r.best_fit or '-')}</td>"
            f"<td>{_num(r.alpha_weighted)}</td><td>{cell('entropy', _num(r.entropy))}</td>"
            f"<td>{cell('mp_softrank', _num(r.mp_softrank))}</td><td>{_num(r.stable_rank, '.2f')}</td>"
            f"<td>{cell('num_spikes', _count(r.num_spikes))}</td><td>{cell('num_traps', _count(r.num_traps))}</td>"
            f"<td class='l'>{_esc(r.status)}</td></tr>"
        )
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    if any(rec.report.estimated for rec in latest):
        parts.append(
            '<p>&asymp; marks an estimate: the layer took the tail path (<code>spectrum="tail"</code>), whose '
            "power-law fit and norms come from the certified top of the spectrum and whose bulk metrics from a "
            "quadrature; its record's <code>estimated</code> field lists every such field.</p>"
        )

    # phase map and trajectories
    parts.append("<h2>Phase map</h2>")
    src = w.png(phase_map_figure(records, dpi=90), "phase_map.png")
    parts.append(f'<img src="{src}" alt="phase of each layer at each snapshot">')
    parts.append("<h2>Trajectories</h2><div class='grid'>")
    for metric in TRAJECTORY_METRICS:
        src = w.png(trajectory_figure(records, metric, layers=layers, dpi=90), f"{metric}.png")
        parts.append(f'<img src="{src}" alt="{_esc(metric)} per layer over steps">')
    parts.append("</div>")

    # alarms
    parts.append(f"<h2>Alarms ({len(alarms)})</h2>")
    if alarms:
        arows = []
        for a in alarms:
            arows.append(
                f"<tr class='sev-{_esc(a.severity)}'><td>{_esc(a.step if a.step is not None else '')}</td>"
                f"<td class='l'>{_esc(a.severity)}</td><td class='l'>{_esc(a.kind)}</td>"
                f"<td class='l'>{_esc(a.layer)}</td><td>{_num(a.value, '.4g')}</td><td>{_num(a.threshold, 'g')}</td>"
                f"<td class='l'>{_esc(a.message)}{'<br><i>' + _esc(a.advice) + '</i>' if a.advice else ''}</td></tr>"
            )
        parts.append(
            "<table><tr><th>step</th><th class='l'>severity</th><th class='l'>kind</th><th class='l'>layer</th>"
            "<th>value</th><th>threshold</th><th class='l'>message</th></tr>" + "".join(arows) + "</table>"
        )
    else:
        parts.append("<p>No alarm fired.</p>")

    # ESD of each layer at its first and last snapshot
    parts.append("<h2>Spectra: first and last snapshot of each layer</h2>")
    if not spectra:
        parts.append(
            '<p class="note">This run recorded no spectra (<code>spectra.jsonl</code>): the panels show the '
            "fitted Marchenko-Pastur and power-law curves only. Record them with <code>keep_evals=True</code> "
            "(the monitor then writes <code>spectra.jsonl</code> next to the records).</p>"
        )
    first_of: dict[str, LayerRecord] = {}
    last_of: dict[str, LayerRecord] = {}
    for rec in records:
        first_of.setdefault(rec.name, rec)
        last_of[rec.name] = rec
    shown = layers if max_layers is None else layers[: max(0, int(max_layers))]
    for i, name in enumerate(shown):
        first, last = first_of[name], last_of[name]
        fig = esd_pair_figure(
            first,
            last,
            first_hist=spectra.get((first.global_step, name)),
            last_hist=spectra.get((last.global_step, name)),
        )
        src = w.png(fig, f"esd_{i:03d}_{_safe(name)}.png")
        parts.append(f'<img src="{src}" alt="ESD of {_esc(name)} at steps {first.global_step} and {last.global_step}">')
    if len(shown) < len(layers):
        parts.append(f"<p>{len(layers) - len(shown)} more layers not drawn (<code>--max-layers</code>).</p>")
    parts.append("</body></html>")
    return w.text(REPORT_FILE, "\n".join(parts) + "\n")


# ------------------------------------------------------------------------- CLI
