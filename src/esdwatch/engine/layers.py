"""Layer discovery: which weight matrices of a model (or a state dict) get an ESD.

Pure and framework-light: imports torch and the standard library only (no Lightning, no
transformers, no peft; foreign layer types are recognised by duck typing).

Conventions (see ``docs/metrics.md`` section 1)
------------------------------------------------
* Every analysed matrix is returned as a :class:`LayerMatrix` whose ``weight`` has shape
  ``(S, N, M)`` with ``N >= M``: ``S`` slices (1 for a dense matrix) whose eigenvalues
  are pooled into one ESD, each oriented so that N >= M (transposed when needed). The
  ESD has ``num_evals = S * M`` eigenvalues lambda_i = nu_i^2 of W^T W (after ``W`` is
  multiplied by ``scale``).
* ``weight`` is a detached *view* of the live parameter whenever possible
  (``detach``/``transpose``/``permute``/slicing never copy): callers that keep it beyond
  the current step, or modify it, must copy. The exceptions are computed matrices: the
  LoRA product B@A (always a fresh tensor) and weights produced by
  ``torch.nn.utils.parametrize`` (``module.weight`` is recomputed on access).
* Names are ``named_modules()`` names (equivalently the state-dict key without its
  ``.weight`` suffix) so that they are stable across calls and line up with
  checkpoints; order is ``named_modules()`` order (state-dict order for a state dict).
  Derived matrices append a suffix: ``.in_proj.q`` / ``.k`` / ``.v`` for the packed
  attention projection, ``[i,j]`` for a conv kernel position, ``.lora_BA`` for a LoRA
  update. Recurrent weights are named like the packed attention projection: the
  parameter's state-dict key (``lstm.weight_ih_l0``, ``gru.weight_hh_l1_reverse``,
  ``cell.weight_ih``; there is no ``weight`` suffix to strip) plus ``.<gate>``
  (``lstm.weight_ih_l0.i``, ``gru.weight_hh_l1_reverse.z``); an ``nn.RNN``'s weights and
  an LSTM projection ``weight_hr_l{k}`` are one matrix each and keep the bare key.
  A ``torch.compile`` wrapper's ``_orig_mod`` component is dropped from names;
  DDP/FSDP's ``module.`` prefix is kept (it is a real module name).

What is analysed (module form)
------------------------------
============================  ============  =====================================================
module                        kind          matrix / matrices
============================  ============  =====================================================
``nn.Linear`` (and subclass)  linear        weight (out x in), oriented
``nn.Embedding(Bag)``         embedding     weight (num x dim), oriented
``nn.Conv{1,2,3}d``,          conv{1,2,3}d  kernel (out, in/groups, *k): prod(k) matrices
``nn.ConvTranspose{1,2,3}d``                out x in/groups, one per kernel position
``nn.MultiheadAttention``     attention     packed ``in_proj_weight`` (3E x E) split into q, k,
                                            v (E x E each), or the separate ``q/k/v_proj_weight``;
                                            its ``out_proj`` is an ``nn.Linear`` child (found as
                                            such, once)
HF ``Conv1D`` (GPT-2)         hf_conv1d     weight stored (in x out); recognised by class name
                                            ``Conv1D`` plus an ``nf`` attribute
LoRA layers (peft, loralib)   lora          s * B @ A for each adapter, ``{name}.lora_BA``
``nn.LSTM``, ``nn.GRU``,      recurrent     for every layer k and direction (``_reverse``):
``nn.RNN`` and their                        ``weight_ih_l{k}`` (G*H x in) and ``weight_hh_l{k}``
``*Cell`` variants                          (G*H x H, or G*H x proj_size) split per gate
                                            in PyTorch's row order: LSTM G=4 (i, f, g, o),
                                            GRU G=3 (r, z, n), RNN G=1 (not split); each gate
                                            H x in or H x H (x proj_size); the LSTM projection
                                            ``weight_hr_l{k}`` (proj_size x H) as its own matrix.
                                            Cells: ``weight_ih`` / ``weight_hh``, same gates
other ``*Linear*`` /          linear /      a 2-D ``weight`` tensor (duck typing, like
``*Embedding*`` classes       embedding     weightwatcher's class-name test)
============================  ============  =====================================================

Recurrent gate matrices are views (``chunk`` rows of the packed parameter), oriented
N >= M like any other. Biases are never matrices. torch's dynamically quantized
``LSTM``/``GRU`` (``torch.ao.nn.quantized.dynamic``) hold packed int8 weights: each such
module is listed as skipped (kind ``recurrent``), not analysed.

Free-standing ``nn.Parameter`` matrices (e.g. CLIP's ``proj``) belong to no such module
and are only found through the state-dict form.

Matching weightwatcher 0.7.7
----------------------------
* Layer types: ww analyses Linear ("dense"), Embedding and Conv2d (plus any class whose
  name contains linear / conv1d / conv2d / embedding, which is how it picks up
  HF ``Conv1D``). It does NOT analyse ``nn.MultiheadAttention``'s packed ``in_proj_weight``
  (only its ``out_proj``), Conv3d (unknown type) or ConvTranspose; esdwatch adds those.
  ww has no convention for recurrent layers: ``nn.LSTM``/``GRU``/``RNN`` are of unknown
  type to it (neither analysed nor listed), and a state dict's ``weight_ih_l0`` keys
  do not end in ``.weight``, so it reads none of them (checked with ww 0.7.7, module
  and state-dict form). esdwatch's per-gate split is its own, on the model of the q/k/v
  split of a packed attention projection.
  For ``torch.nn.Conv1d`` ww takes the 3-D kernel as one matrix with
  N, M = max, min of its three dims (so M is usually the kernel width and the layer is
  dropped by ``min_evals``); esdwatch slices it per tap like a Conv2d instead, so Conv1d
  numbers are not comparable with ww's.
* ``min_evals`` / ``max_evals`` bound the number of eigenvalues of the ESD,
  ``num_evals = S * M`` (M = min(N, M) of one slice): exactly ww's ``layer_supported``,
  which tests ``M * rf`` when pooling (its default) and ``M`` per slice when not. For a
  dense matrix this is M; for a pooled conv kernel S * M. For a LoRA update the lower
  bound applies to the rank r (only r eigenvalues of B@A are non-zero; ww likewise
  tests the A factor, whose M is r). ww's separate ``max_N = 50000`` cap is not applied.
  ww's ``describe()``/``analyze()`` default ``min_evals`` is 8; esdwatch defaults to 50
  (the size floor of ``docs/metrics.md``).
* ``conv2d_norm`` (ww default True) rescales Conv2d kernels before the SVD, which changes
  the norm metrics (log_norm, log_spectral_norm, alpha_weighted ...) but not alpha. ww's
  ``apply_normalize_Wmats`` multiplies by ``sqrt(conv2d_count / 2)``, and
  ``conv2d_count`` is ``kh*kw`` only when slices are analysed one by one
  (``pool=False``) and stays 1 when they are pooled (``pool=True``, ww's default). So
  esdwatch sets ``scale = sqrt(kh*kw / 2)`` for ``conv_mode="slices"`` and
  ``scale = sqrt(1 / 2)`` for ``conv_mode="pooled"``; with these, lambda_max and
  log_norm equal ww's in both modes (checked in tests/test_layers.py). ww applies no
  such factor to Conv1d/Conv3d (nor to anything else), and neither does esdwatch.
* State dicts: ww reads keys ending in ``.weight``; 2-D tensors are dense, 4-D conv2d.
  esdwatch reads keys ending in ``weight`` (which also catches ``in_proj_weight``) with
  2 to 5 dims, and recurrent ``weight_ih/hh/hr[_l{k}[_reverse]]`` keys; see
  :func:`find_layers`.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esdwatch.schema import SkippedLayer

__all__ = [
    "LayerMatrix",
    "SkippedLayer",
    "find_layers",
    "iter_layers",
    "clean_module_name",
    "unwrap_compiled",
    "KINDS",
    "CONV_MODES",
]

#: Every value :attr:`LayerMatrix.kind` can take.
KINDS: frozenset[str] = frozenset(
    {"linear", "embedding", "conv1d", "conv2d", "conv3d", "attention", "hf_conv1d", "lora", "recurrent", "matrix"}
)
CONV_MODES: tuple[str, ...] = ("pooled", "slices")


@dataclass(frozen=True)
class LayerMatrix:
    """One matrix (or stack of slices pooled into one ESD) to analyse.

    Attributes:
        name: stable name, the ``named_modules()`` name or state-dict key without
            ``.weight`` plus a suffix for derived matrices (``.in_proj.q``, ``[i,j]``,
            ``.lora_BA``, a recurrent gate ``lstm.weight_ih_l0.i``).
        kind: one of :data:`KINDS`.
        module_type: class name of the module it came from, ``"tensor"`` for
            state-dict entries.
        weight: ``(S, N, M)`` tensor with ``N >= M``; a detached view of the live
            parameter when possible (callers copy before keeping or modifying it).
        scale: multiply ``weight`` by this before computing eigenvalues
            (ww's conv2d_norm, see the module docstring); 1.0 otherwise.
        source_shape: stored shape of what the matrix was cut from, before orientation:
            the parameter's shape for a whole parameter or pooled kernel, the piece's
            shape for an ``in_proj`` block (E, E), a recurrent gate (H, in) or one
            kernel position (out, in).
            Empty when unknown (hand-built instances): :attr:`shape` then falls back to
            the oriented matrix shape.
        param_name: fully qualified parameter name (state-dict key) it came from, e.g.
            ``"encoder.layer.0.attention.self.query.weight"``; for LoRA the A factor's.
    """

    name: str
    kind: str
    module_type: str
    weight: torch.Tensor = field(compare=False, repr=False)
    scale: float = 1.0
    source_shape: tuple[int, ...] = ()
    param_name: str = ""

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.ndim != 3:
            raise ValueError(f"LayerMatrix {self.name!r}: weight must be an (S, N, M) tensor")
        if w.shape[1] < w.shape[2]:
            raise ValueError(f"LayerMatrix {self.name!r}: weight must be oriented N >= M, got {tuple(w.shape)}")

    @property
    def N(self) -> int:
        return int(self.weight.shape[1])

    @property
    def M(self) -> int:
        return int(self.weight.shape[2])

    @property
    def Q(self) -> float:
        """Aspect ratio N / M >= 1."""
        return self.N / self.M if self.M else math.inf

    @property
    def num_slices(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_evals(self) -> int:
        """Eigenvalues in the pooled ESD: S * M."""
        return self.num_slices * self.M

    @property
    def shape(self) -> tuple[int, ...]:
        """Original (stored) shape; see ``source_shape``."""
        return tuple(self.source_shape) if self.source_shape else (self.N, self.M)

    @property
    def stored_transposed(self) -> bool:
        """True when a 2-D parameter is stored (M x N) and ``weight`` is its transpose.

        Positions in ``weight`` (row, col) are then (col, row) in the parameter as stored,
        e.g. an ``nn.Linear`` (out < in) whose weight was oriented N >= M.
        """
        src = tuple(self.source_shape or ())
        return len(src) == 2 and self.num_slices == 1 and src == (self.M, self.N) and self.M != self.N

    def __repr__(self) -> str:
        return (
            f"LayerMatrix(name={self.name!r}, kind={self.kind!r}, module_type={self.module_type!r}, "
            f"S={self.num_slices}, N={self.N}, M={self.M}, scale={self.scale:g})"
        )


# --------------------------------------------------------------------------- helpers


def _orient(w: torch.Tensor) -> torch.Tensor:
    """(..., a, b) -> (..., N, M) with N >= M, by a transpose view (no copy)."""
    return w.transpose(-2, -1) if w.shape[-2] < w.shape[-1] else w


def clean_module_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components that ``torch.compile`` adds.

    torch.compile wraps a module in an ``OptimizedModule`` whose only child is
    ``_orig_mod``; dropping that component gives the names the user's own module has
    (``"_orig_mod.fc1"`` -> ``"fc1"``). Other names are returned unchanged.
    """
    if "_orig_mod" not in name:
        return name
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def _is_uninitialized(t: torch.Tensor) -> bool:
    return nn.parameter.is_lazy(t)  # isinstance(t, UninitializedTensorMixin)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return () if _is_uninitialized(t) else tuple(int(s) for s in t.shape)


def _status_problem(t: Any) -> str | None:
    """Why a tensor can't be analysed at all (before any size test), or None."""
    if not isinstance(t, torch.Tensor):
        return f"weight is not a tensor ({type(t).__name__})"
    if _is_uninitialized(t):
        return "uninitialized (lazy) parameter: shape not known until the first forward"
    if t.is_meta:
        return "on the meta device (no data)"
    if not t.is_floating_point():
        # int8/uint8/4-bit-packed quantized weights: their values are codes, not the
        # matrix; dequantizing is the quantization library's business.
        return f"non-floating dtype {t.dtype} (quantized or integer weight)"
    if t.numel() == 0:
        return "empty tensor (e.g. an FSDP shard held on another rank)"
    return None


def _tie_key(t: torch.Tensor) -> tuple:
    # Same storage, offset (data_ptr includes it), shape, stride and dtype = the same
    # matrix: catches `lm_head.weight = embed.weight` both for modules (one Parameter)
    # and for state dicts (two keys, one tensor).
    try:
        return (t.device.type, t.device.index, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage (DTensor ...)
        return ("id", id(t))


def _as_list(x: str | Iterable[str] | None) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


class _Pattern:
    """A glob (fnmatch, case-sensitive, whole name) or, with a ``re:`` prefix, a regex (re.search)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            self._match: Callable[[str], bool] = lambda s: rx.search(s) is not None
        else:
            self._match = lambda s: fnmatch.fnmatchcase(s, pattern)

    def __call__(self, name: str) -> bool:
        return self._match(name)


@dataclass
class _Config:
    include: list[_Pattern]
    exclude: list[_Pattern]
    kinds: set[str] | None
    classes: tuple[type, ...]
    min_evals: int | None
    max_evals: int | None
    conv_mode: str
    conv2d_norm: bool

    def selected(self, names: Sequence[str], kind: str, module: nn.Module | None) -> bool:
        """Whether the user's filters keep a matrix; ``names`` = its name and base names."""
        if self.kinds is not None or self.classes:
            ok = (self.kinds is not None and kind in self.kinds) or (
                module is not None and bool(self.classes) and isinstance(module, self.classes)
            )
            if not ok:
                return False
        if self.include and not any(p(n) for p in self.include for n in names):
            return False
        if self.exclude and any(p(n) for p in self.exclude for n in names):
            return False
        return True

    def size_problem(self, m: LayerMatrix, rank: int | None = None) -> str | None:
        S, M, n = m.num_slices, m.M, m.num_evals
        what = f"M={M}" if S == 1 else f"num_evals={n} ({S} slices x M={M})"
        if rank is not None and self.min_evals and rank < self.min_evals:
            return f"rank r={rank} < min_evals={self.min_evals}"
        if rank is None and self.min_evals and n < self.min_evals:
            return f"{what} < min_evals={self.min_evals}"
        if self.max_evals and n > self.max_evals:
            return f"{what} > max_evals={self.max_evals}"
        return None


@dataclass
class _Item:
    """One output matrix of a candidate."""

    name: str
    weight: torch.Tensor  # (S, N, M), oriented
    scale: float
    source_shape: tuple[int, ...]


@dataclass
class _Candidate:
    """A parameter (or LoRA pair) that yields one or more matrices.

    ``names`` lists (matrix name, extra names a filter may match) without touching data,
    so filters run first; ``make`` builds the views only for tensors that passed the
    status checks.
    """

    group: str  # name for skip entries and ties ("attn.in_proj", "conv1", "x.lora_BA")
    kind: str
    module_type: str
    module: nn.Module | None
    tensors: tuple[Any, ...]  # checked by _status_problem; the first one defines ties
    param_name: str
    names: list[tuple[str, tuple[str, ...]]]
    make: Callable[[], list[_Item]]
    rank: int | None = None  # LoRA: min_evals applies to the rank
    shape: tuple[int, ...] = ()
    problem: str | None = None  # known up front to be unanalysable (reported as skipped)
    check: Callable[[], str | None] | None = None  # a problem found once the tensors are valid


# ------------------------------------------------------------------ matrix builders


def _kernel_names(group: str, t: torch.Tensor, conv_mode: str) -> list[tuple[str, tuple[str, ...]]]:
    if conv_mode == "pooled" or _is_uninitialized(t):
        return [(group, ())]
    k = tuple(int(s) for s in t.shape[2:])
    return [(f"{group}[{','.join(map(str, pos))}]", (group,)) for pos in itertools.product(*map(range, k))]


def _kernel_items(group: str, w: torch.Tensor, conv_mode: str, norm: bool) -> list[_Item]:
    """Matrices of a conv kernel w (out, in/groups, *k): one per kernel position.

    pooled: one (S, N, M) stack, S = prod(k), via ``flatten(2).permute(2, 0, 1)``: a view for
    contiguous and channels_last kernels (their kernel dims merge without a copy; an
    exotic stride pattern makes ``flatten`` copy, which is correct, just not free);
    slice s = kernel position ``unravel_index(s, k)``, row-major (ww's slice order).
    slices: one (1, N, M) view per position, named ``group[i,j]``.
    ``norm`` applies ww's conv2d_norm factor (see module docstring).
    """
    k = tuple(int(s) for s in w.shape[2:])
    S = math.prod(k)
    if conv_mode == "pooled":
        scale = math.sqrt(1 / 2) if norm else 1.0
        stack = _orient(w.flatten(2).permute(2, 0, 1))
        return [_Item(group, stack, scale, tuple(w.shape))]
    scale = math.sqrt(S / 2) if norm else 1.0
    items = []
    for pos in itertools.product(*map(range, k)):
        sl = w[(slice(None), slice(None)) + pos]
        items.append(_Item(f"{group}[{','.join(map(str, pos))}]", _orient(sl).unsqueeze(0), scale, tuple(sl.shape)))
    return items


def _dense_candidate(
    group: str, kind: str, module_type: str, module: nn.Module | None, t: Any, pname: str
) -> _Candidate:
    def make() -> list[_Item]:
        w = t.detach()
        return [_Item(group, _orient(w).unsqueeze(0), 1.0, tuple(w.shape))]

    return _Candidate(
        group,
        kind,
        module_type,
        module,
        (t,),
        pname,
        [(group, ())],
        make,
        shape=_shape(t) if isinstance(t, torch.Tensor) else (),
    )


def _conv_candidate(
    group: str, kind: str, module_type: str, module: nn.Module | None, t: Any, pname: str, cfg: _Config
) -> _Candidate:
    norm = cfg.conv2d_norm and kind == "conv2d"

    def make() -> list[_Item]:
        return _kernel_items(group, t.detach(), cfg.conv_mode, norm)

    names: list[tuple[str, tuple[str, ...]]]
    names = _kernel_names(group, t, cfg.conv_mode) if isinstance(t, torch.Tensor) else [(group, ())]
    return _Candidate(
        group,
        kind,
        module_type,
        module,
        (t,),
        pname,
        names,
        make,
        shape=_shape(t) if isinstance(t, torch.Tensor) else (),
    )


def _in_proj_candidate(
    group: str, module_type: str, module: nn.Module | None, t: torch.Tensor, pname: str
) -> _Candidate:
    """Packed (3E, E) q/k/v projection -> three (E, E) views named group.q/.k/.v."""
    names: list[tuple[str, tuple[str, ...]]] = [(f"{group}.{p}", (group,)) for p in "qkv"]

    def make() -> list[_Item]:
        w = t.detach()
        return [_Item(n, _orient(c).unsqueeze(0), 1.0, tuple(c.shape)) for (n, _), c in zip(names, w.chunk(3, dim=0))]

    return _Candidate(group, "attention", module_type, module, (t,), pname, names, make, shape=_shape(t))


#: Gate names of a packed recurrent weight, in PyTorch's row order (() = one matrix, not split).
_LSTM_GATES: tuple[str, ...] = ("i", "f", "g", "o")
_GRU_GATES: tuple[str, ...] = ("r", "z", "n")
_GATES_BY_COUNT: dict[int, tuple[str, ...]] = {1: (), 3: _GRU_GATES, 4: _LSTM_GATES}
_GATES_BY_MODE: dict[str, tuple[str, ...]] = {"LSTM": _LSTM_GATES, "GRU": _GRU_GATES, "RNN_TANH": (), "RNN_RELU": ()}
_RNN_CLASS_NAMES = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"})


def _recurrent_candidate(
    group: str,
    module_type: str,
    module: nn.Module | None,
    t: Any,
    pname: str,
    gates: tuple[str, ...],
    hidden: int | None,
) -> _Candidate:
    """A recurrent weight: (G*H, X) packed per gate -> G views (H, X) named group.<gate>.

    ``gates`` empty: one matrix named ``group`` (nn.RNN, a projection ``weight_hr``).
    """
    names: list[tuple[str, tuple[str, ...]]] = [(f"{group}.{g}", (group,)) for g in gates] if gates else [(group, ())]

    def check() -> str | None:
        if t.ndim != 2:
            return f"{t.ndim}-D weight {tuple(t.shape)} is not a matrix"
        if gates and hidden and t.shape[0] != len(gates) * hidden:
            return f"weight {tuple(t.shape)} is not {len(gates)} gates x hidden_size={hidden} rows"
        return None

    def make() -> list[_Item]:
        w = t.detach()
        if not gates:
            return [_Item(group, _orient(w).unsqueeze(0), 1.0, tuple(w.shape))]
        chunks = w.chunk(len(gates), dim=0)
        return [_Item(n, _orient(c).unsqueeze(0), 1.0, tuple(c.shape)) for (n, _), c in zip(names, chunks)]

    shape = _shape(t) if isinstance(t, torch.Tensor) else ()
    return _Candidate(group, "recurrent", module_type, module, (t,), pname, names, make, shape=shape, check=check)


def _recurrent_module_candidates(name: str, mod: nn.Module) -> list[_Candidate]:
    """The weights of an ``nn.RNN``/``LSTM``/``GRU`` (every layer and direction) or of a cell."""
    tname = type(mod).__name__
    pfx = f"{name}." if name else ""
    hidden = int(getattr(mod, "hidden_size", 0)) or None
    if isinstance(mod, nn.RNNBase):
        gates = _GATES_BY_MODE.get(str(mod.mode), ())
        attrs: list[str] = []
        for layer in range(int(mod.num_layers)):
            for sfx in ("", "_reverse") if mod.bidirectional else ("",):
                attrs += [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
                if int(getattr(mod, "proj_size", 0) or 0) > 0:
                    attrs.append(f"weight_hr_l{layer}{sfx}")
    else:  # nn.RNNCellBase
        if isinstance(mod, nn.LSTMCell):
            gates = _LSTM_GATES
        elif isinstance(mod, nn.GRUCell):
            gates = _GRU_GATES
        else:
            gates = ()  # nn.RNNCell (or an unknown cell: its weights are analysed whole)
        attrs = ["weight_ih", "weight_hh"]
    # getattr, not _parameters: a parametrized or weight-normed weight is an attribute
    return [
        _recurrent_candidate(
            f"{pfx}{a}",
            tname,
            mod,
            getattr(mod, a, None),
            f"{pfx}{a}",
            () if a.startswith("weight_hr") else gates,
            hidden,
        )
        for a in attrs
    ]


_CONV_KIND = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
_WEIGHT_KIND = {3: "conv1d", 4: "conv2d", 5: "conv3d"}  # state-dict kernels by ndim


def _lora_candidate(
    group: str, module_type: str, module: nn.Module | None, A: Any, B: Any, scaling: float, pname: str
) -> _Candidate:
    """The LoRA update s * B @ A (peft/loralib layout: A (r, in[, *k]), B (out, r[, 1...]))."""

    def aligned() -> str | None:
        if A.ndim < 2 or B.ndim < 2 or any(int(s) != 1 for s in B.shape[2:]) or B.shape[1] != A.shape[0]:
            return f"LoRA factors cannot be aligned: B {tuple(B.shape)} @ A {tuple(A.shape)}"
        return None

    def make() -> list[_Item]:
        a, b = A.detach(), B.detach()
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        with torch.no_grad():
            delta = b.reshape(b.shape[0], b.shape[1]).to(dt) @ a.reshape(a.shape[0], -1).to(dt)
            if scaling != 1.0:
                delta = delta * scaling
        delta = delta.reshape((b.shape[0],) + tuple(a.shape[1:]))  # conv LoRA: a kernel delta
        if delta.ndim == 2:
            return [_Item(group, _orient(delta).unsqueeze(0), 1.0, tuple(delta.shape))]
        # Conv LoRA: pooled like a conv kernel, no conv2d_norm (ww never normalizes LoRA).
        return _kernel_items(group, delta, "pooled", False)

    known = all(isinstance(t, torch.Tensor) and not _is_uninitialized(t) and t.ndim >= 2 for t in (A, B))
    rank = int(A.shape[0]) if known else None
    shape = (int(B.shape[0]),) + tuple(int(s) for s in A.shape[1:]) if known else ()  # that of the delta
    return _Candidate(
        group, "lora", module_type, module, (A, B), pname, [(group, ())], make, rank=rank, shape=shape, check=aligned
    )


def _lora_suffix(adapter: str) -> str:
    # peft's default adapter (and factor tensors without an adapter level) get the bare
    # ".lora_BA"; other adapters are told apart by name, so names stay stable when an
    # adapter is added.
    return ".lora_BA" if adapter in ("", "default") else f".lora_BA.{adapter}"


# ------------------------------------------------------------------------ module form

_LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def _lora_factors(obj: Any, factor_ids: set[int]) -> dict[str, Any]:
    """{adapter: tensor} for peft ModuleDict/ParameterDict, a module, or a bare tensor."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if isinstance(obj, (nn.ModuleDict, nn.ParameterDict, dict)):
        out = {}
        for k, v in obj.items():
            if isinstance(v, nn.Module):
                factor_ids.add(id(v))
                v = getattr(v, "weight", None)
            if isinstance(v, torch.Tensor):
                out[str(k)] = v
        return out
    if isinstance(obj, nn.Module):
        factor_ids.add(id(obj))
        w = getattr(obj, "weight", None)
        return {"": w} if isinstance(w, torch.Tensor) else {}
    return {}


def _lora_scaling(module: nn.Module, adapter: str) -> float:
    s = getattr(module, "scaling", None)
    if isinstance(s, Mapping):
        return float(s.get(adapter, 1.0))
    if isinstance(s, (int, float)):
        return float(s)
    return 1.0


def _module_candidates(
    name: str, mod: nn.Module, cfg: _Config, factor_ids: set[int], deferred: list[_Candidate]
) -> list[_Candidate]:
    """Candidates a module contributes by itself (children are visited separately)."""
    tname = type(mod).__name__
    pfx = f"{name}." if name else ""

    if isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
        return _recurrent_module_candidates(name, mod)
    if tname in _RNN_CLASS_NAMES and type(mod).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
        # torch's dynamically quantized LSTM/GRU keep packed int8 weights, not matrices
        cand = _dense_candidate(name, "recurrent", tname, mod, None, name)
        cand.problem = "quantized recurrent module (packed int8 weights, not floating matrices)"
        return [cand]

    if isinstance(mod, nn.MultiheadAttention):
        if getattr(mod, "in_proj_weight", None) is not None:
            return [_in_proj_candidate(f"{pfx}in_proj", tname, mod, mod.in_proj_weight, f"{pfx}in_proj_weight")]
        out: list[_Candidate] = []
        for p in ("q", "k", "v"):
            t = getattr(mod, f"{p}_proj_weight", None)
            if t is not None:
                out.append(_dense_candidate(f"{pfx}{p}_proj", "attention", tname, mod, t, f"{pfx}{p}_proj_weight"))
        return out  # out_proj is an nn.Linear child

    out = []
    is_lora = False
    for a_attr, b_attr in _LORA_PAIRS:
        if not (hasattr(mod, a_attr) and hasattr(mod, b_attr)):
            continue
        As = _lora_factors(getattr(mod, a_attr), factor_ids)
        Bs = _lora_factors(getattr(mod, b_attr), factor_ids)
        for adapter in As:
            if adapter in Bs:
                is_lora = True
                key = f".{adapter}" if adapter else ""
                deferred.append(
                    _lora_candidate(
                        f"{name}{_lora_suffix(adapter)}",
                        tname,
                        mod,
                        As[adapter],
                        Bs[adapter],
                        _lora_scaling(mod, adapter),
                        f"{pfx}{a_attr}{key}",
                    )
                )
    if is_lora and isinstance(getattr(mod, "base_layer", None), nn.Module):
        # peft: the base weight lives in the `base_layer` child (found there, under that
        # name); the wrapper's `weight` property merely forwards to it.
        return out

    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd):
        kind = _CONV_KIND.get(len(mod.kernel_size))
        if kind is not None and w is not None:
            out.append(_conv_candidate(name, kind, tname, mod, w, f"{pfx}weight", cfg))
        return out
    if isinstance(mod, nn.Linear):
        kind = "linear"
    elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        kind = "embedding"
    elif tname == "Conv1D" and hasattr(mod, "nf"):
        # transformers.pytorch_utils.Conv1D (GPT-2 family): a dense layer whose weight is
        # stored (in, out); orientation makes it N >= M like any other.
        kind = "hf_conv1d"
    elif "linear" in tname.lower() and w is not None:
        # Duck typing, as ww does (class name contains "linear"): quantized/custom
        # Linear replacements. Their weight may be a buffer, an int8 code, or a method.
        kind = "linear"
    elif "embedding" in tname.lower() and isinstance(w, torch.Tensor) and w.ndim == 2:
        kind = "embedding"
    else:
        return out
    if w is None:
        return out
    if isinstance(w, torch.Tensor) and not _is_uninitialized(w) and w.ndim < 2:
        return out  # 1-D: a gain vector, not a matrix (never a candidate, like a bias)
    if isinstance(w, torch.Tensor) and not _is_uninitialized(w) and w.ndim > 2 and w.is_floating_point():
        cand = _dense_candidate(name, kind, tname, mod, w, f"{pfx}weight")
        cand.problem = f"{w.ndim}-D weight {tuple(w.shape)} is not a matrix"  # e.g. nn.Bilinear
        out.append(cand)
        return out
    out.append(_dense_candidate(name, kind, tname, mod, w, f"{pfx}weight"))
    return out


def _iter_module(model: nn.Module, cfg: _Config) -> Iterator[LayerMatrix | SkippedLayer]:
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    factor_ids: set[int] = set()
    # LoRA products wait until the walk leaves their module's subtree, so they follow
    # the base layer (`x.base_layer`, then `x.lora_BA`) as in the state-dict order.
    pending: list[tuple[str, list[_Candidate]]] = []
    # remove_duplicate=False: a module registered twice is visited under both names and
    # its parameters are then reported as tied, instead of silently vanishing.
    for raw, mod in model.named_modules(remove_duplicate=False):
        name = clean_module_name(raw)
        while pending and not _in_subtree(name, pending[-1][0]):
            for cand in pending.pop()[1]:
                yield from _process(cand, cfg, seen)
        if id(mod) in factor_ids:
            continue  # LoRA A/B factor: analysed as the product
        deferred: list[_Candidate] = []
        for cand in _module_candidates(name, mod, cfg, factor_ids, deferred):
            yield from _process(cand, cfg, seen)
        if deferred:
            pending.append((name, deferred))
    while pending:
        for cand in pending.pop()[1]:
            yield from _process(cand, cfg, seen)


def _in_subtree(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


# -------------------------------------------------------------------- state-dict form

_LORA_KEY = re.compile(r"^(?:(?P<base>.*)\.)?(?P<pfx>lora_(?:embedding_)?)(?P<ab>[AB])(?:\.(?P<ad>[^.]+))?$")


def _key_name(key: str) -> str:
    """State-dict key -> layer name: "x.weight" -> "x", "attn.in_proj_weight" -> "attn.in_proj"."""
    if key == "weight":
        return ""
    if key.endswith(".weight"):
        return key[: -len(".weight")]
    if key.endswith("_weight"):
        return key[: -len("_weight")]
    return key


_RNN_KEY = re.compile(r"^(?P<mod>(?:.*\.)?)weight_(?P<which>ih|hh|hr)(?P<sfx>_l[0-9]+(?:_reverse)?)?$")


def _state_dict_gates(sd: Mapping[str, Any], r: re.Match[str]) -> tuple[tuple[str, ...], int | None]:
    """(gates, hidden_size) of a recurrent weight key, from its ``weight_hh`` (and ``weight_hr``).

    ``weight_hh`` is (G*H, H), or (G*H, P) with a projection ``weight_hr`` (P, H): G = 4 is
    an LSTM, 3 a GRU, 1 an RNN. Anything else is analysed whole (no gate split).
    """
    if r["which"] == "hr":
        return (), None
    mod, sfx = r["mod"], r["sfx"] or ""
    hh, hr = sd.get(f"{mod}weight_hh{sfx}"), sd.get(f"{mod}weight_hr{sfx}")
    if not isinstance(hh, torch.Tensor) or _is_uninitialized(hh) or hh.ndim != 2:
        return (), None
    H = (
        int(hr.shape[1])
        if isinstance(hr, torch.Tensor) and not _is_uninitialized(hr) and hr.ndim == 2
        else int(hh.shape[1])
    )
    if H <= 0 or hh.shape[0] % H:
        return (), None
    gates = _GATES_BY_COUNT.get(int(hh.shape[0]) // H)
    return (gates, H) if gates is not None else ((), None)


def _iter_state_dict(sd: Mapping[str, Any], cfg: _Config) -> Iterator[LayerMatrix | SkippedLayer]:
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue  # e.g. `_extra_state` objects
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        m = _LORA_KEY.match(stem)
        if m:
            # LoRA factors never stand alone: A yields the product with its B.
            if m["ab"] == "B":
                continue
            b_stem = stem[: m.start("ab")] + "B" + stem[m.end("ab") :]
            b_key = b_stem + key[len(stem) :]
            base = m["base"] or ""
            group = f"{base}{_lora_suffix(m['ad'] or '')}"
            B = sd.get(b_key)
            if not isinstance(B, torch.Tensor):
                cand = _dense_candidate(group, "lora", "tensor", None, t, key)
                cand.problem = f"LoRA factor {key} has no matching {b_key}"
            else:
                # adapter scaling (lora_alpha / r) lives in the adapter config, not in
                # the state dict: the product here is unscaled B @ A.
                cand = _lora_candidate(group, "tensor", None, t, B, 1.0, key)
            yield from _process(cand, cfg, seen)
            continue
        r = _RNN_KEY.match(key)
        if r and not _is_uninitialized(t) and t.ndim == 2:
            gates, hidden = _state_dict_gates(sd, r)
            yield from _process(_recurrent_candidate(key, "tensor", None, t, key, gates, hidden), cfg, seen)
            continue
        if not key.endswith("weight"):
            continue  # biases, buffers (position_ids, masks, rotary tables): never matrices
        name = _key_name(key)
        if _is_uninitialized(t):  # a LazyModule's weight: its shape is not known yet
            yield from _process(_dense_candidate(name, "matrix", "tensor", None, t, key), cfg, seen)
            continue
        if t.ndim < 2:
            continue  # norm gains and other 1-D weights are not matrices
        if t.ndim == 2:
            if key.endswith("in_proj_weight") and t.shape[0] == 3 * t.shape[1]:
                cand = _in_proj_candidate(name, "tensor", None, t, key)
            else:
                if re.search(r"(^|\.)[qkv]_proj_weight$", key):
                    kind = "attention"  # nn.MultiheadAttention with kdim/vdim != embed_dim
                else:
                    kind = "embedding" if "embed" in key.lower() else "matrix"
                cand = _dense_candidate(name, kind, "tensor", None, t, key)
        elif t.ndim in _WEIGHT_KIND:
            cand = _conv_candidate(name, _WEIGHT_KIND[t.ndim], "tensor", None, t, key, cfg)
        else:
            continue  # > 5-D: not a layer weight we know
        yield from _process(cand, cfg, seen)


# -------------------------------------------------------------------------- pipeline


def _process(
    cand: _Candidate, cfg: _Config, seen: dict[tuple, tuple[str, torch.Tensor]]
) -> Iterator[LayerMatrix | SkippedLayer]:
    keep = [n for n, extra in cand.names if cfg.selected((n,) + extra, cand.kind, cand.module)]
    if not keep:
        return  # filtered out by the user: not a skip
    problem = cand.problem
    for t in cand.tensors:
        problem = problem or _status_problem(t)
    if not problem and cand.check is not None:
        problem = cand.check()
    if problem:
        yield SkippedLayer(cand.group, cand.kind, cand.shape, problem)
        return
    # Ties: the first tensor (a LoRA's A factor) identifies the candidate; a module
    # registered twice or a tied lm_head is analysed once, under the first name.
    key = _tie_key(cand.tensors[0])
    if key in seen:
        yield SkippedLayer(cand.group, cand.kind, cand.shape, f"tied to {seen[key][0]}")
        return
    # keep a reference so the storage (and its address) can't be reused meanwhile
    seen[key] = (cand.group, cand.tensors[0])
    keep_set = set(keep)
    for it in cand.make():
        if it.name not in keep_set:
            continue
        mat = LayerMatrix(it.name, cand.kind, cand.module_type, it.weight, it.scale, it.source_shape, cand.param_name)
        problem = cfg.size_problem(mat, cand.rank)
        if problem:
            yield SkippedLayer(mat.name, mat.kind, mat.shape, problem)
        else:
            yield mat


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The user's module inside (possibly nested) ``torch.compile`` wrappers, else ``model``.

    ``torch.compile(model)`` returns an ``OptimizedModule`` holding the user's module as
    ``_orig_mod``; layers are discovered on that, so names carry no ``_orig_mod.`` prefix.
    """
    while type(model).__name__ == "OptimizedModule" and isinstance(
        inner := getattr(model, "_orig_mod", None), nn.Module
    ):
        model = inner
    return model


def iter_layers(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    min_evals: int | None = 50,
    max_evals: int | None = 15000,
    conv_mode: str = "pooled",
    conv2d_norm: bool = True,
) -> Iterator[LayerMatrix | SkippedLayer]:
    """Generator form of :func:`find_layers`: matrices and skips, interleaved in model order.

    Arguments are validated at once; the model is walked lazily as the iterator is consumed.
    """
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    classes: tuple[type, ...]
    if types is None:
        kinds, classes = None, ()
    else:
        tlist = [types] if isinstance(types, (str, type)) else list(types)
        kinds = {t for t in tlist if isinstance(t, str)}
        unknown = kinds - KINDS
        if unknown:
            raise ValueError(f"unknown layer kinds {sorted(unknown)}; known: {sorted(KINDS)}")
        classes = tuple(t for t in tlist if isinstance(t, type))
        if not kinds and classes:
            kinds = None
    cfg = _Config(
        include=[_Pattern(p) for p in _as_list(include)],
        exclude=[_Pattern(p) for p in _as_list(exclude)],
        kinds=kinds,
        classes=classes,
        min_evals=min_evals,
        max_evals=max_evals,
        conv_mode=conv_mode,
        conv2d_norm=conv2d_norm,
    )
    if isinstance(model_or_state_dict, nn.Module):
        return _iter_module(unwrap_compiled(model_or_state_dict), cfg)
    if isinstance(model_or_state_dict, Mapping):
        return _iter_state_dict(model_or_state_dict, cfg)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")


def find_layers(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    min_evals: int | None = 50,
    max_evals: int | None = 15000,
    conv_mode: str = "pooled",
    conv2d_norm: bool = True,
) -> tuple[list[LayerMatrix], list[SkippedLayer]]:
    """The weight matrices of a model or state dict, and the candidates that were skipped.

    Args:
        model_or_state_dict: an ``nn.Module`` (DDP/FSDP/``torch.compile`` wrappers fine)
            or a ``Mapping[str, Tensor]`` state dict (unwrap a Lightning checkpoint's
            ``"state_dict"`` first).
        include, exclude: a pattern or list of patterns matched against matrix names: a
            glob (``fnmatch``, whole name, case-sensitive, e.g. ``"encoder.layer.*.query"``)
            or, when prefixed ``"re:"``, a regular expression found anywhere in the name
            (``re.search``; anchor with ``^``/``$``). A matrix is kept when it matches
            some ``include`` (all, if none given) and no ``exclude``. A conv kernel's
            slices (``conv1[0,1]``) also match through their layer name (``conv1``), and
            the pieces of a packed weight (``mha.in_proj.q``, ``lstm.weight_ih_l0.i``)
            through the packed one's name (``mha.in_proj``, ``lstm.weight_ih_l0``).
        types: kinds (see :data:`KINDS`) and/or module classes (``isinstance``); a matrix
            is kept when its kind or its module matches one of them
            (``types=["recurrent"]``: every LSTM/GRU/RNN gate and projection).
        min_evals, max_evals: bounds on the ESD's eigenvalue count ``num_evals = S * M``
            (M = min(N, M) of a slice): M for a dense matrix or a single slice, S * M for
            a pooled kernel, and the rank r (lower bound) for a LoRA product. This is
            weightwatcher's rule. ``None``/0 disables a bound.
        conv_mode: ``"pooled"`` (default) gives one matrix per conv layer with
            S = prod(kernel size) slices whose eigenvalues form one ESD: weightwatcher's
            default (``pool=True``), and it gives enough eigenvalues for a power-law fit
            even for narrow layers. ``"slices"`` gives one matrix per kernel position,
            named ``f"{name}[{i},{j}]"`` (``[i]`` for Conv1d, ``[i,j,l]`` for Conv3d):
            the published per-feature-map analysis (Martin & Mahoney).
        conv2d_norm: ww's Conv2d rescaling (default True): ``scale = sqrt(kh*kw/2)`` per
            slice in "slices" mode and ``sqrt(1/2)`` in "pooled" mode, which is what ww
            0.7.7 applies in the matching mode (module docstring). Affects norm metrics
            only.

    Returns:
        ``(matrices, skipped)``, both in model order. ``skipped`` holds every candidate
        that passed the user's filters but cannot or should not be analysed: too few /
        too many eigenvalues (``"M=2 < min_evals=50"``), non-floating (quantized) dtype,
        meta or uninitialized (lazy) parameters, empty shards, and parameters tied to
        one analysed earlier (``"tied to <name>"``: tied embeddings / lm_head are
        analysed once, under the first name). Matrices removed by ``include``/
        ``exclude``/``types`` appear in neither list. 1-D tensors (biases, norm
        gains) are never candidates.

    State dicts: every tensor whose key ends in ``weight`` (``x.weight``,
    ``attn.in_proj_weight``) with 2 dims is a matrix (kind ``"embedding"`` when the key
    contains "embed", else ``"matrix"``; a packed ``in_proj_weight`` (3E x E) is split into
    q, k, v like the module form); with 3, 4 or 5 dims it is a conv1d/2d/3d kernel. Other
    2-D tensors are not candidates: in state dicts they are mostly buffers (position ids,
    attention masks, rotary tables), not learned layer weights. LoRA factors
    (``x.lora_A[.adapter][.weight]`` + ``lora_B``) yield their product ``x.lora_BA``
    (unscaled: the scaling lives in the adapter config). Recurrent keys
    (``x.weight_ih_l0[_reverse]``, ``x.weight_hh_l0``, ``x.weight_hr_l0``, a cell's
    ``x.weight_ih``) are kind ``"recurrent"``, split per gate as in the module form: the
    gate count G comes from ``weight_hh`` (G*H x H, or G*H x P beside a projection
    ``weight_hr`` of P x H): 4 = LSTM (i, f, g, o), 3 = GRU (r, z, n), 1 = RNN; any other
    shape is analysed whole. Names equal the module form's:
    a model and its ``state_dict()`` give the same names and (N, M).

    Weights are views of the live tensors (no copy; a pooled kernel is
    ``flatten(2).permute(2, 0, 1)``, a non-contiguous view, which copies only for an
    unusual kernel memory layout), so copy what you keep. LoRA products are computed
    (fresh tensors, float32 or wider).
    """
    mats: list[LayerMatrix] = []
    skipped: list[SkippedLayer] = []
    for x in iter_layers(
        model_or_state_dict,
        include=include,
        exclude=exclude,
        types=types,
        min_evals=min_evals,
        max_evals=max_evals,
        conv_mode=conv_mode,
        conv2d_norm=conv2d_norm,
    ):
        if isinstance(x, LayerMatrix):
            mats.append(x)
        else:
            skipped.append(x)
    return mats, skipped
