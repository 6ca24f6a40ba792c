"""The analyzer: from a model (or matrices) to a :class:`~esdwatch.engine.model_report.ModelReport`.

Pipeline, per call: discover layers (:mod:`esdwatch.engine.layers`), screen out non-finite
weights, compute all eigenvalues in batched torch calls (:mod:`esdwatch.engine.spectrum`), then
per layer the power-law and MP fits and metrics (:mod:`esdwatch.engine.metrics`), the phase
(:mod:`esdwatch.engine.phases`) and the correlation-trap test (:mod:`esdwatch.engine.traps`).
A layer that fails is reported with ``status="failed"`` and the error; the other layers
are still analysed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from esdwatch.engine.layers import LayerMatrix, find_layers
from esdwatch.engine.metrics import DEFAULT_ZERO_TOL, layer_metrics
from esdwatch.engine.model_report import ModelReport
from esdwatch.engine.mp import DEFAULT_TW_MARGIN, fit_mp
from esdwatch.engine.phases import DEFAULT_THRESHOLDS, classify_report
from esdwatch.engine.spectrum import MIXED_ZERO_FLOOR, DeferredMatrix, Method, batch_eigenvalues, iter_eigenvalues
from esdwatch.engine.tail import AUTO_MIXED_MIN_Q, TailLayer, check_spectrum, tail_layer, uses_tail
from esdwatch.engine.tail_laws import FitType, check_fit, tail_law_fields
from esdwatch.engine.threads import parallel_map
from esdwatch.engine.traps import randomize_matrix, trap_fields_from_evals
from esdwatch.schema import (
    STATUS_DEGENERATE,
    STATUS_FAILED,
    STATUS_NON_FINITE,
    LayerReport,
    SkippedLayer,
)

log = logging.getLogger(__name__)

__all__ = ["AnalysisConfig", "analyze", "analyze_matrix", "analyze_layers", "layer_report"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that decides what is computed for each layer.

    Parameters
    ----------
    dtype:
        Compute precision of the eigenvalues (float64 default; float32 is faster and
        loses ~1e-7 relative on the eigenvalues through the SVD route).
    device:
        Where eigenvalues are computed; ``None`` keeps each weight on its own device.
    method:
        ``"auto"`` / ``"gram"`` / ``"svd"`` / ``"mixed"``: see :mod:`esdwatch.engine.spectrum`.
    spectrum:
        ``"exact"`` (every eigenvalue), ``"tail"`` (certified top eigenvalues and a
        quadrature bulk, :mod:`esdwatch.engine.tail`; each record lists its estimated
        metrics in ``LayerReport.estimated``) or ``"auto"`` (the tail path for single
        matrices with M >= ``esdwatch.engine.tail.AUTO_MIN_M`` of the device, the
        measured crossover; a layer whose x_min is not certified within M / 16 Krylov vectors
        (M / 4 with ``"tail"``) falls back to the exact path). With ``method="auto"``, an
        ``"auto"`` analysis decomposes tall matrices (N >= 2M,
        :data:`esdwatch.engine.tail.AUTO_MIXED_MIN_Q`) by the ``"mixed"`` route (float32
        Gram product, float64 eigenvalues; experiments/results/precision.md).
    xmin, xmax:
        Fix the power-law tail bounds instead of scanning x_min by KS distance.
    fix_fingers:
        Put x_min at the peak of the log-ESD instead (weightwatcher's ``xmin_peak``).
    mp_fit:
        Fit the Marchenko-Pastur bulk (lambda_plus, soft rank, spikes).
    tw_margin:
        Spikes are eigenvalues above lambda_plus + tw_margin * (Tracy-Widom scale);
        ``None`` uses :func:`esdwatch.engine.mp.fit_mp`'s default.
    zero_tol:
        Relative tolerance of ``rank_collapse_fraction``.
    phases:
        Classify each layer into the 5+1 phases (:mod:`esdwatch.engine.phases`).
    traps:
        Run the correlation-trap test (one more eigendecomposition per layer).
    keep_evals:
        Keep each layer's eigenvalues (numpy, ascending) on ``LayerReport.evals``.
    seed:
        Seed of the element-wise randomization of the trap test.
    fit:
        ``"PL"`` (default): the power-law fit only. ``"TPL"``: also the truncated power law
        and the best tail law (PL, TPL, lognormal, exponential) on the power law's tail;
        ``"E_TPL"``: the same above the x_min of the ESD-peak window (``fix_fingers``), as
        weightwatcher's extended TPL (:mod:`esdwatch.engine.tail_laws`; needs ``powerlaw``,
        the ``fits`` extra).
    alpha_ci:
        Add a bootstrap 95% interval of alpha (``alpha_ci_low``/``alpha_ci_high``; the
        whole fit, x_min scan included, on 200 resamples: 0.5-1 s per layer of 384
        eigenvalues, for the offline analyzer).
    num_threads:
        Torch intra-op threads for the duration of the analysis (``None``: leave as is).
        torch's thread count is process-wide: set it only in a process that does
        nothing else meanwhile (the CLI, a process worker). Under core oversubscription
        (training beside the analysis on the same cores) OpenMP threads spin-wait, and
        more threads make the eigenvalues far slower, not faster
        (experiments/results/engine_design_notes.md).
    """

    dtype: torch.dtype = torch.float64
    device: str | None = None
    method: Method = "auto"
    spectrum: str = "exact"
    xmin: float | None = None
    xmax: float | None = None
    fix_fingers: bool = False
    mp_fit: bool = True
    tw_margin: float | None = None
    zero_tol: float = DEFAULT_ZERO_TOL
    phases: bool = True
    traps: bool = True
    keep_evals: bool = False
    seed: int = 0
    num_threads: int | None = None
    fit: FitType = "PL"
    alpha_ci: bool = False

    def __post_init__(self) -> None:
        check_fit(self.fit)
        check_spectrum(self.spectrum)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _weight_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the precision the weights are stored in."""
    if dtype in (torch.float64,):
        return float(np.finfo(np.float64).eps)
    if dtype in (torch.float16,):
        return float(np.finfo(np.float16).eps)
    if dtype == torch.bfloat16:
        return 2.0**-7
    return float(np.finfo(np.float32).eps)


def layer_report(mat: LayerMatrix, **fields: Any) -> LayerReport:
    """A LayerReport for ``mat`` with its identity (name, kind, shape) filled in."""
    return LayerReport(
        name=mat.name,
        kind=mat.kind,
        N=mat.N,
        M=mat.M,
        Q=mat.Q,
        num_slices=mat.num_slices,
        **fields,
    )


def _screen_weight(W: torch.Tensor) -> tuple[int, int]:
    """(non-finite entries, dead units) of a stack W (S, N, M) from four reductions.

    Dead units are all-zero rows plus all-zero columns (over every conv slice): a row is
    zero when its maximum and minimum both are. NaN propagates through ``amax``/``amin``
    and an Inf survives one of them, so the row extremes already say whether W is finite;
    the exact count is taken only when it is not. Reducing W directly, rather than
    ``W.abs()``, avoids allocating and writing a copy of the weights.
    """
    W = W.reshape(-1, W.shape[-2], W.shape[-1])
    row_max, row_min = W.amax(dim=-1), W.amin(dim=-1)  # (S, N)
    if not bool(torch.isfinite(row_max).all() and torch.isfinite(row_min).all()):
        return int((~torch.isfinite(W)).sum().item()), -1
    col_max, col_min = W.amax(dim=-2), W.amin(dim=-2)  # (S, M)
    dead_rows = ((row_max == 0) & (row_min == 0)).all(dim=0)
    dead_cols = ((col_max == 0) & (col_min == 0)).all(dim=0)
    return 0, int(dead_rows.sum().item()) + int(dead_cols.sum().item())


def _try_screen(W: torch.Tensor) -> tuple[int, int] | Exception:
    try:
        return _screen_weight(W)
    except Exception as exc:
        return exc


def analyze_layers(
    mats: Sequence[LayerMatrix],
    config: AnalysisConfig = AnalysisConfig(),
) -> list[LayerReport]:
    """Analyse already-discovered layer matrices (e.g. a training snapshot).

    Returns one :class:`LayerReport` per input, in input order, never raising for a bad
    layer: non-finite weights give ``status="non_finite"``, an all-zero matrix
    ``status="degenerate"``, any unexpected error ``status="failed"``.
    """
    with _torch_threads(config.num_threads), torch.no_grad():
        return _analyze_layers(mats, config)


def _analyze_layers(mats: Sequence[LayerMatrix], config: AnalysisConfig) -> list[LayerReport]:
    reports: list[LayerReport | None] = [None] * len(mats)
    dead_units = _screen_layers(mats, reports)
    finite_idx = sorted(dead_units)
    n = len(finite_idx)
    if not n:
        return [r for r in reports if r is not None]
    tails = _tail_layers(mats, finite_idx, config)
    # originals and (for the trap test) their element-wise randomizations go through one
    # batched decomposition; the randomizations are built where they are decomposed (in
    # parallel on the CPU backend, each copy freed as soon as its eigenvalues are known)
    exact = [i for i in finite_idx if i not in tails or tails[i].evals is None]
    rand = [i for i in finite_idx if config.traps and i not in tails]
    weights: list[Any] = [mats[i].weight for i in exact]
    weights += [DeferredMatrix(mats[i].weight, partial(randomize_matrix, seed=config.seed)) for i in rand]
    scales = [mats[i].scale for i in exact + rand]
    methods = [_dense_method(mats[i], config, tails.get(i)) for i in exact] + [
        _dense_method(mats[i], config) for i in rand
    ]
    computed: dict[int, Any] = {}
    for method in dict.fromkeys(methods):  # one batched pass per route
        ks = [k for k, m in enumerate(methods) if m == method]
        done = _all_eigenvalues([weights[k] for k in ks], [scales[k] for k in ks], config, method)
        computed.update({ks[j]: ev for j, ev in done.items()})
    at = {i: k for k, i in enumerate(exact)}
    at_rand = {i: len(exact) + k for k, i in enumerate(rand)}
    for i in finite_idx:
        tail = tails.get(i)
        ev = computed[at[i]] if i in at else tail.evals  # type: ignore[union-attr]
        rev = computed.get(at_rand[i]) if i in at_rand else (tail.rand if tail is not None else None)
        reports[i] = _finish_layer(mats[i], ev, rev, config, dead_units[i], tail)
    return [r for r in reports if r is not None]


def _dense_method(mat: LayerMatrix, config: AnalysisConfig, tail: TailLayer | None = None) -> Method:
    """The route of a layer's dense decomposition: under ``spectrum="auto"``, a tall single
    matrix (N >= AUTO_MIXED_MIN_Q * M) takes the mixed route (esdwatch.engine.tail).

    Unless its tail attempt already saw the spectrum reach below ``MIXED_ZERO_FLOOR``
    lambda_max (the smallest Ritz value lies above the smallest eigenvalue, by Cauchy
    interlacing): the mixed route's guard would compute it again with the float64 product.
    The attempt sees a null space only when its basis exceeds the rank, so a collapsed
    layer of higher rank still pays for both products (figures:
    experiments/results/engine_design_notes.md).
    """
    auto = config.spectrum == "auto" and config.method == "auto" and config.dtype == torch.float64
    if auto and mat.num_slices == 1 and mat.kind != "lora" and mat.N >= AUTO_MIXED_MIN_Q * mat.M:
        top = tail.top if tail is not None else None
        if top is not None and top.ritz.size and top.ritz.min() < MIXED_ZERO_FLOOR * top.ritz.max():
            return config.method
        return "mixed"
    return config.method


def _tail_layers(mats: Sequence[LayerMatrix], idx: Sequence[int], config: AnalysisConfig) -> dict[int, TailLayer]:
    """The tail path's results for the layers that take it (esdwatch.engine.tail)."""
    out: dict[int, TailLayer] = {}
    tw_margin = DEFAULT_TW_MARGIN if config.tw_margin is None else config.tw_margin
    for i in idx:
        if not uses_tail(mats[i], config.spectrum, config.device):
            continue
        try:
            out[i] = tail_layer(
                mats[i],
                spectrum=config.spectrum,
                device=config.device,
                traps=config.traps,
                seed=config.seed,
                tw_margin=tw_margin,
            )
        except Exception:
            log.debug("tail path failed for %r, using the exact path", mats[i].name, exc_info=True)
    return out


def _screen_layers(mats: Sequence[LayerMatrix], reports: list[LayerReport | None]) -> dict[int, int]:
    """Screen every weight: ``{index: dead units}`` of the finite ones; the others get their
    (failed / non-finite) report in ``reports``."""
    dead_units: dict[int, int] = {}
    # the screening reductions release the GIL: spread over the threads like the spectra
    for i, screened in parallel_map(_try_screen, [mat.weight for mat in mats]):
        mat = mats[i]
        if isinstance(screened, Exception):  # e.g. a tensor type torch cannot reduce
            reports[i] = layer_report(mat, status=STATUS_FAILED, status_detail=f"{type(screened).__name__}: {screened}")
            continue
        bad, dead = screened
        if bad:
            reports[i] = layer_report(
                mat,
                status=STATUS_NON_FINITE,
                status_detail=f"{bad} of {mat.weight.numel()} entries are NaN or Inf",
                num_non_finite=bad,
            )
            continue
        dead_units[i] = dead
    return dead_units


def _all_eigenvalues(
    weights: Sequence[Any], scales: Sequence[float], config: AnalysisConfig, method: Method | None = None
) -> dict[int, torch.Tensor | Exception]:
    """``{k: eigenvalues of weights[k]}``, or the exception that entry raised.

    One batched pass (by ``method``, default ``config.method``); if a batched call fails
    (e.g. out of memory), the entries not yet done are retried one by one.
    """
    method = config.method if method is None else method
    computed: dict[int, torch.Tensor | Exception] = {}
    try:
        # every spectrum first, then the fits: fitting one layer (Python, holding the GIL)
        # while the pool decomposes the next makes the pool wait for the GIL at each
        # kernel boundary (experiments/results/engine_design_notes.md)
        for k, ev in iter_eigenvalues(weights, scales=scales, dtype=config.dtype, device=config.device, method=method):
            computed[k] = ev
    except Exception:
        log.debug("batched eigenvalues failed, retrying layer by layer", exc_info=True)
        for k, (W, scale) in enumerate(zip(weights, scales)):
            if k not in computed:
                try:
                    computed[k] = batch_eigenvalues(
                        [W], scales=[scale], dtype=config.dtype, device=config.device, method=method
                    )[0]
                except Exception as exc:
                    computed[k] = exc
    return computed


def _finish_layer(
    mat: LayerMatrix,
    ev: Any,
    rand: Any,
    config: AnalysisConfig,
    dead_units: int,
    tail: TailLayer | None = None,
) -> LayerReport:
    """The report of one finite layer from its spectra (original, and randomized with traps)."""
    if isinstance(ev, Exception):
        return layer_report(mat, status=STATUS_FAILED, status_detail=f"eigenvalues: {type(ev).__name__}: {ev}")
    try:
        return _analyze_one(mat, ev, None if isinstance(rand, Exception) else rand, config, dead_units, tail)
    except Exception as exc:
        log.warning(
            "esdwatch: analysis of layer %r failed: %s", mat.name, exc, exc_info=log.isEnabledFor(logging.DEBUG)
        )
        return layer_report(mat, status=STATUS_FAILED, status_detail=f"{type(exc).__name__}: {exc}")


def _analyze_one(
    mat: LayerMatrix,
    evals_t: Any,
    rand_evals_t: Any,
    config: AnalysisConfig,
    dead_units: int,
    tail: TailLayer | None = None,
) -> LayerReport:
    ev = evals_t if isinstance(evals_t, np.ndarray) else evals_t.detach().to("cpu", torch.float64).numpy()
    if mat.kind == "lora":
        ev = _lora_nonzero(ev, mat)
    # one MP fit shared by the metrics and the phase classifier
    tw_margin = DEFAULT_TW_MARGIN if config.tw_margin is None else config.tw_margin
    mp = fit_mp(ev, mat.N, mat.M, tw_margin=tw_margin) if config.mp_fit and ev.size and ev.max() > 0 else None
    fields = layer_metrics(
        ev,
        mat.N,
        mat.M,
        num_slices=mat.num_slices,
        weight_eps=_weight_eps(mat.weight.dtype),
        xmin=config.xmin,
        xmax=config.xmax,
        fix_fingers=config.fix_fingers or config.fit == "E_TPL",
        mp_fit=config.mp_fit,
        tw_margin=config.tw_margin,
        zero_tol=config.zero_tol,
        mp=mp,
    )
    fields["dead_units"] = dead_units
    if tail is not None:
        fields.update(tail.overrides, estimated=",".join(tail.estimated))
        fields["spectrum"] = "exact" if tail.evals is None or not tail.overrides else "tail"
    if not (fields.get("lambda_max", 0.0) > 0):
        fields["status"] = STATUS_DEGENERATE
        fields["status_detail"] = "all-zero matrix: no spectrum to fit"
    report = layer_report(mat, **fields)
    if report.ok and (config.fit != "PL" or config.alpha_ci):
        report = report.replace(
            **tail_law_fields(
                ev,
                report.xmin,
                fit=config.fit,
                alpha_ci=config.alpha_ci,
                xmin=config.xmin,
                xmax=config.xmax,
                fix_fingers=config.fix_fingers or config.fit == "E_TPL",
                seed=config.seed,
            )
        )

    if config.phases and report.ok:
        report = _with_phase(report, ev, mp, tw_margin)
    if rand_evals_t is not None and report.ok:
        report = report.replace(**_trap_fields(mat, ev, rand_evals_t, config))
    if config.keep_evals:
        report = report.replace(evals=ev)
    return report


def _with_phase(report: LayerReport, ev: np.ndarray, mp: Any, tw_margin: float) -> LayerReport:
    if tw_margin != DEFAULT_THRESHOLDS.tw_margin:
        mp = None  # fitted with another spike margin: the classifier fits its own
    return classify_report(report, ev, mp=mp)


def _lora_nonzero(ev: np.ndarray, mat: LayerMatrix) -> np.ndarray:
    """The r nonzero eigenvalues of a LoRA update s * B @ A of inner rank r.

    The other M - r eigenvalues are zero by construction (structural, like those of a
    rectangular matrix), so they are dropped rather than read as rank collapse; with r
    below the size floor the fits then report too few eigenvalues instead of a phase.
    """
    lam_max = float(ev[-1]) if ev.size else 0.0
    if lam_max <= 0:
        return ev
    tol = lam_max * (max(mat.N, mat.M) * float(np.finfo(np.float32).eps)) ** 2
    return ev[ev > tol]


def _trap_fields(
    mat: LayerMatrix, ev: np.ndarray, rand_evals_t: torch.Tensor, config: AnalysisConfig
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {} if config.tw_margin is None else {"tw_margin": config.tw_margin}
    fields = trap_fields_from_evals(
        mat.weight, ev, rand_evals_t, mat.N, mat.M, transpose_entries=mat.stored_transposed, **kwargs
    )
    known = {f.name for f in dataclasses.fields(LayerReport)}
    return {k: v for k, v in fields.items() if k in known}


def analyze(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    layers: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Iterable[Any] | None = None,
    min_evals: int = 50,
    max_evals: int | None = 15000,
    conv_mode: str = "pooled",
    conv2d_norm: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    method: Method = "auto",
    spectrum: str = "exact",
    xmin: float | None = None,
    xmax: float | None = None,
    fix_fingers: bool = False,
    mp_fit: bool = True,
    tw_margin: float | None = None,
    phases: bool = True,
    traps: bool = True,
    keep_evals: bool = False,
    seed: int = 0,
    num_threads: int | None = None,
    fit: FitType = "PL",
    alpha_ci: bool = False,
    progress: Any = None,
) -> ModelReport:
    """Analyse every weight matrix of a model: the offline, whole-model entry point.

    Parameters
    ----------
    model_or_state_dict:
        An ``nn.Module`` or a mapping of parameter names to tensors.
    layers, exclude:
        Name patterns to include / exclude (globs, or regexes prefixed ``"re:"``).
    types:
        Layer kinds (``"linear"``, ``"conv2d"`` ...) or module classes to keep.
    min_evals, max_evals:
        Layers whose M = min(N, M) lies outside are reported in ``skipped``, with the
        reason; with ``spectrum`` ``"tail"`` or ``"auto"`` a single matrix above
        ``max_evals`` is analysed on the tail path instead (nothing is skipped for size).
    progress:
        Called as ``progress(done, total)`` after each group of layers (the CLI's bar).
    conv_mode:
        ``"pooled"`` (one ESD per conv layer, weightwatcher's default) or ``"slices"``.
    conv2d_norm:
        Scale Conv2d slices by sqrt(kh * kw / 2) as weightwatcher does.
    Remaining parameters: see :class:`AnalysisConfig`.

    Returns
    -------
    ModelReport with one LayerReport per analysed matrix (model order) and the skipped ones.
    """
    start = time.perf_counter()
    config = AnalysisConfig(
        dtype=dtype,
        device=None if device is None else str(device),
        method=method,
        spectrum=spectrum,
        xmin=xmin,
        xmax=xmax,
        fix_fingers=fix_fingers,
        mp_fit=mp_fit,
        tw_margin=tw_margin,
        phases=phases,
        traps=traps,
        keep_evals=keep_evals,
        seed=seed,
        num_threads=num_threads,
        fit=fit,
        alpha_ci=alpha_ci,
    )
    with torch.no_grad():
        mats, skipped = find_layers(
            model_or_state_dict,
            include=layers,
            exclude=exclude,
            types=types,
            min_evals=min_evals,
            max_evals=None if spectrum != "exact" else max_evals,
            conv_mode=conv_mode,
            conv2d_norm=conv2d_norm,
        )
        mats, skipped, forced = _size_limit(mats, list(skipped), max_evals, spectrum)
        reports = _analyze_in_groups(mats, config, forced, progress)
    if not mats:
        log.warning("esdwatch: no analyzable layer found (%d skipped)", len(skipped))
    return ModelReport(layers=tuple(reports), skipped=tuple(skipped), elapsed_s=time.perf_counter() - start)


def _size_limit(
    mats: Sequence[LayerMatrix], skipped: list[Any], max_evals: int | None, spectrum: str
) -> tuple[list[LayerMatrix], list[Any], set[int]]:
    """Apply ``max_evals`` after discovery when the tail path can take large matrices.

    Returns the layers to analyse, the skipped ones (a conv stack above the limit, which
    has no tail path, is listed with the reason) and the indices forced onto the tail path.
    """
    if spectrum == "exact" or not max_evals:
        return list(mats), skipped, set()
    keep: list[LayerMatrix] = []
    forced: set[int] = set()
    for mat in mats:
        if mat.num_evals <= max_evals:
            keep.append(mat)
        elif mat.num_slices == 1 and mat.kind != "lora":
            forced.add(len(keep))
            keep.append(mat)
        else:
            reason = f"num_evals={mat.num_evals} > max_evals={max_evals} (no tail path for a stack of slices)"
            skipped.append(SkippedLayer(name=mat.name, kind=mat.kind, shape=tuple(mat.weight.shape), reason=reason))
    return keep, skipped, forced


def _analyze_in_groups(
    mats: Sequence[LayerMatrix], config: AnalysisConfig, forced: set[int], progress: Any
) -> list[LayerReport]:
    """analyze_layers over groups of layers (one for exact, one per tail-path layer), with progress.

    Layers in ``forced`` take the tail path whatever ``config.spectrum`` says (above max_evals).
    """
    tail_cfg = dataclasses.replace(config, spectrum="tail")
    is_tail = [i in forced or uses_tail(m, config.spectrum, config.device) for i, m in enumerate(mats)]
    groups: list[list[int]] = []
    dense = [i for i, t in enumerate(is_tail) if not t]
    # the exact layers in groups of similar size so that the bar moves (the batched call
    # is per group); every tail-path layer on its own
    size = 8 if progress is not None else max(1, len(dense))
    for start in range(0, len(dense), size):
        groups.append(dense[start : start + size])
    groups += [[i] for i, t in enumerate(is_tail) if t]
    out: list[LayerReport | None] = [None] * len(mats)
    done = 0
    for group in groups:
        cfg = tail_cfg if group and group[0] in forced else config
        for i, report in zip(group, analyze_layers([mats[i] for i in group], cfg)):
            out[i] = report
        done += len(group)
        if progress is not None:
            progress(done, len(mats))
    return [r for r in out if r is not None]


def analyze_matrix(
    W: Any,
    *,
    name: str = "W",
    kind: str = "matrix",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    **options: Any,
) -> LayerReport:
    """Analyse one matrix (N x M in any orientation, numpy or torch, or an (S, N, M) stack).

    ``options`` are :class:`AnalysisConfig` fields (``xmin``, ``traps``, ``keep_evals`` ...).
    No size floor applies: the caller asked for this matrix.
    """
    W = torch.as_tensor(W)
    if W.ndim not in (2, 3):
        raise ValueError(f"analyze_matrix needs a 2-D matrix or a 3-D stack of slices, got shape {tuple(W.shape)}")
    if not (W.is_floating_point()):
        W = W.to(torch.float64)
    if W.shape[-2] < W.shape[-1]:
        W = W.transpose(-2, -1)
    stack = W if W.ndim == 3 else W.unsqueeze(0)
    mat = LayerMatrix(name=name, kind=kind, module_type="tensor", weight=stack)
    config = AnalysisConfig(dtype=dtype, device=None if device is None else str(device), **options)
    with torch.no_grad():
        return analyze_layers([mat], config)[0]
