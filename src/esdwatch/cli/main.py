"""The ``esdwatch`` command line: ``esdwatch analyze TARGET``, ``esdwatch report LOG_DIR``,
``esdwatch config [NAME]`` and ``esdwatch --version``.

User errors (a missing file, a file that is not a model) print one sentence on stderr
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from esdwatch.cli.configs import CLI_SCRIPT, ConfigError, config_text, describe_configs
from esdwatch.cli.loading import TargetError, load_target
from esdwatch.reporting.html import ReportError, build_report

#: Columns of the per-layer table, in order (LayerReport field names).
TABLE_COLUMNS: tuple[str, ...] = (
    "name",
    "kind",
    "N",
    "M",
    "alpha",
    "alpha_sigma",
    "alpha_ci_low",
    "alpha_ci_high",
    "D",
    "xmin",
    "best_fit",
    "alpha_weighted",
    "log_spectral_norm",
    "stable_rank",
    "entropy",
    "mp_softrank",
    "num_spikes",
    "num_traps",
    "phase",
    "spectrum",
    "status",
)


#: Columns filled only by an option (fit="TPL"/"E_TPL", alpha_ci=True).
_OPTIONAL_COLUMNS = frozenset({"alpha_ci_low", "alpha_ci_high", "best_fit"})


def _shown(column: str, records: list[dict[str, Any]]) -> bool:
    """Whether the table shows ``column``: options not asked for (all empty) are left out,
    and ``spectrum`` only when some layer took the tail path (else every value is exact)."""
    if column == "spectrum":
        return any(r.get("spectrum") == "tail" for r in records)
    return column not in _OPTIONAL_COLUMNS or any(_filled(r.get(column)) for r in records)


def _filled(value: Any) -> bool:
    return value is not None and value != ""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, int) and value < 0:
        return "-"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table (numbers right-aligned)."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) and c not in ("name", "kind") for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def render_report(report, fmt: str) -> str:
    """Render a ModelReport as ``table``, ``csv`` or ``json`` text."""
    records = report.to_records()
    if fmt == "json":
        payload = {
            "layers": records,
            "skipped": [s.to_dict() for s in report.skipped],
            "summary": {k: (v if math.isfinite(v) else None) for k, v in report.summary().items()},
            "alarms": [a.to_dict() for a in _alarms(report)],
        }
        return json.dumps(payload, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        if records:
            writer = csv.DictWriter(buf, fieldnames=list(records[0].keys()), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        return buf.getvalue().rstrip("\n")
    columns = [c for c in TABLE_COLUMNS if _shown(c, records)]
    parts = [f"{len(report.layers)} analyzed matrices ({report.elapsed_s:.2f} s)", format_table(records, columns)]
    estimated = {name for layer in report.layers if layer.spectrum == "tail" for name in layer.estimated_fields}
    if estimated:
        shown = ", ".join(c for c in columns if c in estimated)
        parts.append(
            "\nspectrum=tail: the power-law fit and the norms come from the certified top of the spectrum;"
            f"\n  estimates from its bulk quadrature: {shown}"
            "\n  (a layer's `estimated` field lists every estimated field: --format json or csv)"
        )
    if report.skipped:
        parts.append(f"\n{len(report.skipped)} skipped:")
        parts += [f"  {s.name} {tuple(s.shape)}: {s.reason}" for s in report.skipped]
    summary = report.summary()
    parts.append("\nsummary (layer averages):")
    parts += [f"  <{k}> = {_fmt(v)}" for k, v in summary.items()]
    alarms = _alarms(report)
    if alarms:
        parts.append(f"\n{len(alarms)} alarms:")
        parts += [f"  [{a.kind}] {a.message}" for a in alarms]
    return "\n".join(parts)


def _alarms(report) -> list:
    return report.alarms()


def _cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from esdwatch.cli.progress import progress_bar
    from esdwatch.engine.analyzer import analyze
    from esdwatch.engine.tail_laws import check_fit

    try:
        check_fit(args.fit)  # a missing extra is an error before the model is loaded
    except ImportError as exc:
        print(f"esdwatch: error: {exc}", file=sys.stderr)
        return 2
    target = load_target(args.target)
    with progress_bar() as progress:
        report = analyze(
            target,
            layers=args.layers or None,
            exclude=args.exclude or None,
            min_evals=args.min_evals,
            max_evals=args.max_evals,
            conv_mode=args.conv_mode,
            dtype=torch.float32 if args.float32 else torch.float64,
            device=args.device,
            traps=not args.no_traps,
            spectrum=args.spectrum,
            fit=args.fit,
            alpha_ci=args.alpha_ci,
            progress=progress,
        )
    text = render_report(report, args.format)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise TargetError(f"Cannot write {args.output} ({exc.strerror or exc}).") from None
        print(f"wrote {len(report.layers)} layers to {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def version() -> str:
    """The installed distribution's version ("unknown" when esdwatch runs from a source tree
    that was never installed)."""
    try:
        return metadata.version("esdwatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esdwatch", description="Heavy-tailed spectral analysis of neural network weights."
    )
    parser.add_argument("--version", action="version", version=f"esdwatch {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="analyse the weight matrices of a model or checkpoint")
    p.add_argument(
        "target",
        help="a Lightning .ckpt, a torch state-dict file, a .safetensors file, a Hugging Face model "
        "directory, or package.module:attribute naming a model or a zero-argument factory",
    )
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--layers", action="append", help="include only layers matching this glob (or re:REGEX); repeatable")
    p.add_argument("--exclude", action="append", help="exclude layers matching this glob (or re:REGEX); repeatable")
    p.add_argument("--min-evals", type=int, default=50, help="skip matrices with fewer eigenvalues (default 50)")
    p.add_argument(
        "--max-evals",
        type=int,
        default=15000,
        help="matrices with more eigenvalues are skipped with --spectrum exact (the default), "
        "and take the tail path otherwise (default 15000)",
    )
    p.add_argument(
        "--spectrum",
        choices=("exact", "tail", "auto"),
        default="exact",
        help="every eigenvalue (exact, default), certified top + estimated bulk (tail), or by matrix size (auto)",
    )
    p.add_argument("--conv-mode", choices=("pooled", "slices"), default="pooled")
    p.add_argument("--float32", action="store_true", help="compute eigenvalues in float32 (faster, less precise)")
    p.add_argument("--device", default=None, help="torch device for the eigenvalues (default: the weights' own)")
    p.add_argument("--no-traps", action="store_true", help="skip the correlation-trap test")
    p.add_argument(
        "--fit",
        choices=("PL", "TPL", "E_TPL"),
        default="PL",
        help="tail fit: PL (default), or also the truncated power law and the best tail law "
        "(TPL; E_TPL: above the ESD-peak x_min); TPL/E_TPL need esdwatch[fits]",
    )
    p.add_argument(
        "--alpha-ci", action="store_true", help="add a bootstrap 95%% interval of alpha (slower: 200 refits per layer)"
    )
    p.set_defaults(func=_cmd_analyze)

    _add_report_command(sub)
    _add_config_command(sub)
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    if args.script:
        print(CLI_SCRIPT, end="")
    elif args.name:
        try:
            print(config_text(args.name), end="")
        except ConfigError as exc:
            print(f"esdwatch: error: {exc}", file=sys.stderr)
            return 2
    else:
        print(describe_configs())
    return 0


def _add_config_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``esdwatch config [NAME] [--script]`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "config",
        help="list or print the LightningCLI configs shipped with esdwatch",
        description="Without NAME, lists the LightningCLI YAML configs shipped with esdwatch; with NAME, prints "
        "that config (esdwatch config live_dashboard > live_dashboard.yaml). --script prints the LightningCLI "
        "script they assume.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the config to print (see the list without NAME)")
    p.add_argument("--script", action="store_true", help="print the LightningCLI(...) script the configs assume")
    p.set_defaults(func=_cmd_config)
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        path = build_report(
            args.log_dir,
            args.output,
            title=args.title,
            embed=args.embed,
            max_layers=None if args.max_layers is not None and args.max_layers < 0 else args.max_layers,
        )
    except (ReportError, ImportError, OSError) as exc:
        print(f"esdwatch: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``esdwatch report LOG_DIR [--output DIR]`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "report",
        help="write a static HTML report (phase map, trajectories, spectra, alarms) of a run's records",
        description="Reads records.jsonl (and alarms.jsonl, spectra.jsonl) under LOG_DIR and writes index.html "
        "plus PNG figures. Works while the run is still training and on interrupted runs.",
    )
    p.add_argument(
        "log_dir", metavar="LOG_DIR", help="the run's log directory, its esdwatch/ directory, or a records.jsonl file"
    )
    p.add_argument("--output", "-o", metavar="DIR", help="report directory (default: <records dir>/report)")
    p.add_argument("--title", help="page title")
    p.add_argument("--embed", action="store_true", help="inline the figures: one self-contained HTML file")
    p.add_argument(
        "--max-layers", type=int, default=64, help="draw the ESDs of at most this many layers (default 64; -1 for all)"
    )
    p.set_defaults(func=_cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TargetError as exc:
        print(f"esdwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esdwatch: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
