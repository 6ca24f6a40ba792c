"""Distributed runs: which rank analyses which layer, and how its full matrix gets there.

:class:`esdwatch.monitor.monitor.Monitor` (and the Lightning ``ESDMonitor`` over it) uses this
module when ``world_size > 1``. The protocol, on every rank, at the same points of
training (the scheduled snapshot steps, epoch ends, the end of training, checkpoints):

1. **Exchange** (:meth:`Comm.all_gather_object`): each rank sends what its own worker
   finished since the last exchange (its *part* of earlier snapshots: reports of the
   layers it owns), whether it has a free snapshot slot, its measured costs and any
   error. Every rank receives every part, so every rank can assemble a complete
   snapshot and compute the same model-level summary (``ModelCheckpoint(monitor=...)``
   needs the key, with the same value, on every rank). Only rank 0 writes records,
   alarms and sinks, and only rank 0 evaluates the alarm policy.
2. **Snapshot decision**: a snapshot is taken when every rank has a free slot, else it is
   skipped on every rank, so snapshot numbers never diverge between ranks.
3. **Sharing** (:func:`assign_owners`): the matrices found by
   :func:`esdwatch.engine.layers.find_layers` (same list, same order on every rank) are dealt to
   the ranks by cost, largest first to the least loaded rank (LPT), with the cost of a
   matrix ``S * N * M**2`` (Gram matrix and eigendecomposition of S slices of N x M,
   N >= M). Deterministic: every rank computes the same owners without communicating.
4. **Materialization** (:func:`gather_to_owner`): a replicated weight (DDP) is already
   whole on its owner, which copies it; nothing is communicated. A DTensor weight
   (FSDP2 ``fully_shard``, Lightning's ``ModelParallelStrategy``, tensor parallelism) is
   sent to its owner only: every rank takes part in the collective for every matrix, in
   the same order, but only the owner receives and keeps the full matrix (see below).
   FSDP1 (``FullyShardedDataParallel``, Lightning's ``"fsdp"`` strategy) has no
   per-parameter sharding to exploit: its flat parameters are unsharded one FSDP unit at
   a time with ``summon_full_params(unit, recurse=False, writeback=False)``, and the
   owner of each matrix of that unit copies it to host memory before the unit is
   resharded (:func:`fsdp1_units`).
5. **Stop** (:meth:`esdwatch.monitor.monitor.Monitor.sync_stop`): right after the exchange, the
   stop decision of rank 0's alarm policy is reduced over all ranks (Lightning:
   ``trainer.strategy.reduce_boolean_decision``; plain loops: :meth:`Comm.any`), so all
   ranks stop at the same step.

Memory profile of the sharded paths (honest, per rank)
------------------------------------------------------
* DTensor, 1-D mesh, ``Shard(d)`` placement (FSDP2): for each matrix, every rank pads its
  local shard to the chunk size (one shard-sized temporary) and
  ``torch.distributed.gather``-s it to the owner; the owner receives ``world_size``
  chunks and concatenates them (about 2x one full matrix, transient), then keeps the
  full matrix as its snapshot buffer until the analysis is done. So a rank holds at
  most: the snapshot of the matrices it owns (about ``1/world_size`` of the analysed
  weights, balanced by cost) plus two copies of one matrix during the gather. No rank
  ever holds the whole model. With gloo, half-precision shards travel as float32.
* DTensor with any other layout (2-D meshes such as HSDP or FSDP+TP, ``_StridedShard``,
  ``Partial``): ``DTensor.full_tensor()``, an all-gather: every rank materializes each
  matrix in turn (one at a time, freed at once by non-owners), only the owner keeps it.
* FSDP1: every rank holds one FSDP unit's unsharded parameters at a time (FSDP's own
  all-gather), and the owner copies its matrices of that unit to host memory. A model
  wrapped without an auto-wrap policy is a single unit: then the whole model is
  unsharded once per snapshot, on every rank; that is FSDP1's granularity, not a
  choice of esdwatch. Layer discovery inside a unit's context is restricted (through an
  ``exclude`` pattern) to the modules whose parameters that unit holds, so the other
  units' sharded or freed views are never touched; this works with
  ``use_orig_params=True`` (Lightning's default) and ``False``. Names drop FSDP's
  ``_fsdp_wrapped_module`` (and ``_checkpoint_wrapped_module``) components, so they
  equal the unwrapped model's; ``layers``/``exclude`` patterns see the wrapped names.

What is verified where: DDP (``ddp_spawn``, gloo, CPU), FSDP2 DTensor weights (CPU, gloo,
``torch.multiprocessing``) and FSDP1 ``summon_full_params`` (CPU, gloo) are tested in
``tests/test_ddp.py`` and ``tests/test_fsdp.py``. Lightning's ``"fsdp"`` strategy refuses
CPU, so the Lightning FSDP path (the same code, reached through ``trainer.strategy.model``)
is unverified on a real GPU run; NCCL object collectives need the current CUDA device
set, which Lightning does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from esdwatch.engine.layers import LayerMatrix, clean_module_name, find_layers, unwrap_compiled
from esdwatch.schema import SkippedLayer

if TYPE_CHECKING:
    from torch.distributed.fsdp import FullyShardedDataParallel

log = logging.getLogger(__name__)

__all__ = [
    "Comm",
    "TorchComm",
    "ShardPlan",
    "layer_cost",
    "assign_owners",
    "is_dtensor",
    "gather_to_owner",
    "fsdp1_units",
    "clean_fsdp_name",
    "plan_snapshot",
    "default_comm",
]

#: module-name components added by FSDP1 and activation-checkpoint wrappers
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


# ------------------------------------------------------------------ communication


class Comm:
    """The collectives the monitor needs; every call must be made by every rank, in order."""

    rank: int = 0
    world_size: int = 1

    def all_gather_object(self, obj: Any) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def any(self, flag: bool) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class TorchComm(Comm):
    """:class:`Comm` over ``torch.distributed`` (default group unless ``group`` is given).

    With NCCL, object collectives go through the current CUDA device (Lightning sets
    it; in a plain loop call ``torch.cuda.set_device(local_rank)`` first).
    """

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "esdwatch: world_size > 1 but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group first (Lightning does it for you)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def _device(self) -> torch.device:
        if self.backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


def default_comm(world_size: int) -> TorchComm:
    """A :class:`TorchComm` over the default group, checked against ``world_size``."""
    comm = TorchComm()
    if comm.world_size != world_size:
        raise RuntimeError(
            f"esdwatch: Monitor(world_size={world_size}) but torch.distributed's default group has "
            f"{comm.world_size} ranks; pass comm=TorchComm(group) for a sub-group"
        )
    return comm


def checked_comm(comm: Comm | None, rank: int, world_size: int) -> Comm:
    """``comm`` (default: :func:`default_comm`), refused unless it places this process at ``rank`` of ``world_size``."""
    comm = default_comm(world_size) if comm is None else comm
    if (comm.rank, comm.world_size) != (rank, world_size):
        raise RuntimeError(
            f"esdwatch: Monitor(rank={rank}, world_size={world_size}) does not match its "
            f"communicator (rank {comm.rank} of {comm.world_size})"
        )
    return comm


# ------------------------------------------------------------------ layer sharing


def layer_cost(mat: LayerMatrix) -> float:
    """Relative analysis cost of a matrix: ``S * N * M**2`` (Gram matrix + eigenvalues)."""
    return float(mat.num_slices) * float(mat.N) * float(mat.M) ** 2


def assign_owners(costs: Sequence[float], world_size: int, loads: list[float] | None = None) -> list[int]:
    """The rank that analyses each item: largest cost first, to the least loaded rank.

    Deterministic (ties: lower index first, then lower rank), so every rank computes the
    same assignment from the same list. ``loads`` (updated in place) carries the ranks'
    loads over several calls, for plans built piece by piece (FSDP1 units).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if loads is None:
        loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: (-float(costs[k]), k)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        owners[i] = r
        loads[r] += float(costs[i])
    return owners


# ------------------------------------------------------------------ materialization


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _chunk_sizes(n: int, parts: int) -> tuple[int, list[int]]:
    """``torch.chunk`` semantics (DTensor's ``Shard``): chunk size and each rank's rows."""
    c = math.ceil(n / parts) if n else 0
    return c, [max(0, min(c, n - r * c)) for r in range(parts)]


def gather_to_owner(w: Any, owner: int, rank: int) -> torch.Tensor | None:
    """The full (global) tensor of DTensor ``w`` on rank ``owner``; None on other ranks.

    A collective: every rank of ``w``'s mesh must call it, for the same tensors in the
    same order. On a 1-D mesh spanning ranks ``0..n-1`` with a ``Shard(d)`` or
    ``Replicate`` placement only the owner receives the data (``gather``; see the module
    docstring for memory); otherwise falls back to ``full_tensor()`` (an all-gather).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    mesh = w.device_mesh
    placements = tuple(w.placements)
    flat = [int(x) for x in mesh.mesh.flatten().tolist()]
    simple = mesh.ndim == 1 and flat == list(range(len(flat))) and owner in flat
    if simple and type(placements[0]) is Replicate:
        return w.to_local().detach() if rank == owner else None
    if not (simple and type(placements[0]) is Shard):
        full = w.full_tensor()
        return full.detach() if rank == owner else None
    group = mesh.get_group()
    d = int(placements[0].dim)
    d = d if d >= 0 else d + w.ndim
    n = int(w.shape[d])
    world = len(flat)
    c, sizes = _chunk_sizes(n, world)
    local = w.to_local().detach()
    dtype = local.dtype
    wire = dtype
    if str(dist.get_backend(group)) == "gloo" and dtype not in (torch.float32, torch.float64):
        wire = torch.float32  # gloo: exact upcast for transport
    shape = list(local.shape)
    shape[d] = c
    padded = torch.zeros(shape, dtype=wire, device=local.device)
    if local.shape[d] > 0:
        padded.narrow(d, 0, local.shape[d]).copy_(local)
    chunks = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, chunks, dst=owner, group=group)
    del padded
    if rank != owner:
        return None
    assert chunks is not None
    full = torch.cat([ch.narrow(d, 0, s) for ch, s in zip(chunks, sizes) if s > 0], dim=d)
    del chunks
    return full if full.dtype == dtype else full.to(dtype)


# ------------------------------------------------------------------ FSDP1


def _fsdp1_class() -> type[FullyShardedDataParallel] | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def fsdp1_units(root: nn.Module | None) -> list[nn.Module]:
    """The ``FullyShardedDataParallel`` (FSDP1) modules of ``root``, outermost first."""
    cls = _fsdp1_class()
    if root is None or cls is None:
        return []
    return [m for m in root.modules() if isinstance(m, cls)]


def clean_fsdp_name(name: str) -> str:
    """``net.0._fsdp_wrapped_module`` -> ``net.0``: the unwrapped model's name."""
    if "_wrapped_module" not in name:
        return name
    parts = name.split(".")
    out: list[str] = []
    for p in parts:
        if p in _WRAPPER_COMPONENTS:
            continue
        # a conv slice suffix may be attached to a wrapper component: "x._fsdp_wrapped_module[0,1]"
        for w in _WRAPPER_COMPONENTS:
            if p.startswith(w + "["):
                if out:
                    out[-1] += p[len(w) :]
                p = ""
                break
        if p:
            out.append(p)
    return ".".join(out)


# ------------------------------------------------------------------ the plan


@dataclass
class ShardPlan:
    """What one snapshot looks like from this rank (identical on every rank but ``owned``)."""

    names: list[str]  # every analysed matrix, in discovery order
    owners: list[int]  # owners[i]: the rank analysing names[i]
    costs: list[float]
    owned: list[tuple[int, LayerMatrix]]  # (index into names, matrix with a full, private or live weight)
    private: list[bool]  # per owned matrix: its weight is already a private copy (no live view)
    skipped: list[SkippedLayer] = field(default_factory=list)
    mode: str = "replicated"  # "replicated" | "dtensor" | "fsdp1"

    def owner_of(self) -> dict[str, int]:
        return dict(zip(self.names, self.owners))


def plan_snapshot(
    model: nn.Module,
    layer_options: Mapping[str, Any],
    rank: int,
    world_size: int,
    *,
    root: nn.Module | None = None,
    select: Any = None,
) -> ShardPlan:
    """Discover, share out and materialize one snapshot (a collective for sharded weights).

    ``layer_options`` are :func:`esdwatch.engine.layers.find_layers`'s keyword arguments;
    ``root`` is the module holding FSDP1 units (Lightning: ``trainer.strategy.model``;
    default ``model``). ``select`` (a :class:`~esdwatch.monitor.rotation.RotationPick`):
    only the matrices it picks are shared out and materialized (rotation; identical on
    every rank). Call on every rank at the same point.
    """
    units = fsdp1_units(root if root is not None else model)
    if units:
        return _plan_fsdp1(
            model, layer_options, rank, world_size, root if root is not None else model, units, select=select
        )
    with torch.no_grad():
        mats, skipped = find_layers(model, **layer_options)
    if select is not None:
        mats = [m for m, keep in zip(mats, select(mats)) if keep]
    costs = [layer_cost(m) for m in mats]
    owners = assign_owners(costs, world_size)
    owned: list[tuple[int, LayerMatrix]] = []
    private: list[bool] = []
    sharded = False
    for i, (mat, owner) in enumerate(zip(mats, owners)):
        if is_dtensor(mat.weight):
            sharded = True
            with torch.no_grad():
                full = gather_to_owner(mat.weight, owner, rank)  # every rank, every matrix, same order
            if owner == rank:
                assert full is not None
                owned.append((i, dataclasses.replace(mat, weight=full)))
                private.append(True)
        elif owner == rank:
            owned.append((i, mat))
            private.append(False)
    return ShardPlan(
        [m.name for m in mats], owners, costs, owned, private, skipped, "dtensor" if sharded else "replicated"
    )


@contextlib.contextmanager
def _summon(unit: nn.Module) -> Iterator[None]:
    cls = _fsdp1_class()
    assert cls is not None
    with cls.summon_full_params(unit, recurse=False, writeback=False):
        yield


#: recurrent weights split per gate: weight_ih_l0.i, weight_hh_l1_reverse.f, weight_hr_l0 (projection)
_RECURRENT = r"weight_(?:ih|hh|hr)(?:_l[0-9]+(?:_reverse)?)?(?:\.[a-z])?"
#: what find_layers appends to a module name for the matrices it derives from it
_DERIVED = r"(?:\.in_proj(?:\.[qkv])?|\.[qkv]_proj|\.lora_BA(?:\.[^.]+)?|\." + _RECURRENT + r"|\[[0-9,]*\])?"
_DERIVED_ROOT = r"(?:in_proj(?:\.[qkv])?|[qkv]_proj|lora_BA(?:\.[^.]+)?|" + _RECURRENT + r"|\[[0-9,]*\])"


def _unit_modules(model: nn.Module, root: nn.Module, units: list[nn.Module]) -> dict[int, list[str]]:
    """id(unit) -> names (as find_layers sees them in ``model``) of the modules whose parameters it holds."""
    unit_ids = {id(u) for u in units}
    owner: dict[int, int] = {}

    def walk(mod: nn.Module, cur: int | None) -> None:
        if id(mod) in unit_ids:
            cur = id(mod)
        if cur is not None:
            owner.setdefault(id(mod), cur)
        for child in mod.children():
            walk(child, cur)

    walk(root, None)
    out: dict[int, list[str]] = {id(u): [] for u in units}
    for raw, mod in unwrap_compiled(model).named_modules(remove_duplicate=False):
        u = owner.get(id(mod))
        if u is not None:
            out[u].append(clean_module_name(raw))
    return out


def _only(names: Sequence[str]) -> str:
    """An ``exclude`` pattern matching every matrix name that is NOT derived from ``names``."""
    alts = [re.escape(n) + _DERIVED for n in names if n]
    if "" in names:
        alts.append(_DERIVED_ROOT + "?")
    body = "|".join(alts) if alts else "(?!)"
    return f"re:^(?!(?:{body})$)"


def _patterns(value: Any) -> list[str]:
    """A ``layers``/``exclude`` option as a list of patterns."""
    return [] if value is None else ([value] if isinstance(value, str) else list(value))


def _first_seen(mats: Sequence[LayerMatrix], seen: set[str]) -> list[LayerMatrix]:
    """The matrices no earlier FSDP unit held, under their FSDP-free names (``seen`` is updated)."""
    fresh = []
    for m in mats:
        clean = clean_fsdp_name(m.name)
        if clean not in seen:
            seen.add(clean)
            fresh.append(dataclasses.replace(m, name=clean))
    return fresh


def _plan_fsdp1(
    model: nn.Module,
    layer_options: Mapping[str, Any],
    rank: int,
    world_size: int,
    root: nn.Module,
    units: list[nn.Module],
    select: Any = None,
) -> ShardPlan:
    names: list[str] = []
    owners: list[int] = []
    costs: list[float] = []
    owned: list[tuple[int, LayerMatrix]] = []
    private: list[bool] = []
    skipped: dict[str, SkippedLayer] = {}
    loads = [0.0] * world_size
    seen: set[str] = set()
    members = _unit_modules(model, root, units)
    user_exclude = _patterns(layer_options.get("exclude"))
    for unit in units:
        if not members[id(unit)]:
            continue
        # only this unit's modules: the others hold sharded (use_orig_params=True) or freed
        # (use_orig_params=False) views that must not be touched
        options = dict(layer_options, exclude=user_exclude + [_only(members[id(unit)])])
        # one unit unsharded at a time (every rank: FSDP's all-gather)
        with _summon(unit), torch.no_grad():
            mats, sk = find_layers(model, **options)
            fresh = _first_seen(mats, seen)
            if select is not None:
                fresh = [m for m, keep in zip(fresh, select.unit(fresh)) if keep]
            c = [layer_cost(m) for m in fresh]
            o = assign_owners(c, world_size, loads)
            for m, ci, oi in zip(fresh, c, o):
                idx = len(names)
                names.append(m.name)
                owners.append(oi)
                costs.append(ci)
                if oi == rank:
                    # a private host copy before the unit is resharded (its storage is freed)
                    owned.append((idx, dataclasses.replace(m, weight=m.weight.detach().to("cpu", copy=True))))
                    private.append(True)
            for sk_layer in sk:
                clean = clean_fsdp_name(sk_layer.name)
                skipped.setdefault(clean, dataclasses.replace(sk_layer, name=clean))
    return ShardPlan(names, owners, costs, owned, private, [s for n, s in skipped.items() if n not in seen], "fsdp1")
