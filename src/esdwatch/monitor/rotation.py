"""A rotating subset of layers per snapshot: bounded cost per snapshot, every layer covered in turn.

With ``layers_per_snapshot`` set (:class:`~esdwatch.monitor.options.MonitorOptions`), a
snapshot copies and analyses only some of the watched matrices: the most stale first
(never analysed, then the longest ago; ties in discovery order), so the layers are taken
round-robin and each one is analysed again within a bounded number of snapshots:

* ``layers_per_snapshot=n`` (an int): the ``n`` most stale layers, so a model of ``L``
  layers is covered every ``ceil(L / n)`` snapshots.
* ``layers_per_snapshot="auto"``: as many of the most stale layers as fit in a cost
  budget per snapshot (:func:`snapshot_budget`), from each layer's measured cost; at
  least one layer per snapshot. Every layer whose cost fits the budget is covered within
  ``ceil(total cost / (budget - largest layer cost)) + 1`` snapshots; the budget grows with
  the run under ``every_n_steps="auto"``, so coverage gets faster as training goes on.

The choice is a pure function of the layer list, the steps each layer was last
snapshotted, the measured costs and the budget (:func:`pick`). Every input is the same on
every rank of a distributed run (the layer list and the steps are; the costs come from
the parts every rank receives at the exchanges, in the same order; the budget from the
costs every rank agreed on), so every rank picks the same layers without communicating.

Per-layer costs. The worker times each job as a whole (CPU seconds of the worker; wall
seconds when the analysis runs on a GPU). :meth:`LayerRotation.observe` splits a part's
seconds over its layers in proportion to their current estimates (a layer not measured
yet: the shape cost ``S * N * M**2`` of :func:`~esdwatch.monitor.distributed.layer_cost`
times the measured seconds per unit of it), and keeps each layer's estimate as a running
average. Since the subsets change from snapshot to snapshot, the estimates follow what
each group of layers measured, not only the shape model.

Records under rotation: each :class:`~esdwatch.schema.LayerRecord` carries the step its
weights were copied (``global_step``), so a layer's values are as of its own latest
snapshot. The model-level summary (``latest_summary``, the ``summary/...`` dashboard keys,
the end-of-run summary and the HTML report) is computed over each layer's latest values,
not over the subset of the latest snapshot, so it does not jump because a subset was
analysed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from esdwatch.engine.layers import LayerMatrix
from esdwatch.monitor.distributed import layer_cost

__all__ = ["LayerRotation", "RotationPick", "pick", "snapshot_budget"]

#: weight of a new measurement in a layer's running cost estimate
COST_EMA = 0.5


def pick(
    last: Sequence[int | None],
    costs: Sequence[float | None],
    *,
    budget_s: float | None = None,
    max_layers: int | None = None,
    nbytes: Sequence[int] | None = None,
    max_bytes: int | None = None,
) -> list[int]:
    """Indices (ascending) of the layers to snapshot: the longest prefix of the staleness order that fits.

    ``last[i]``: the step layer ``i`` was last snapshotted (None: never); ``costs[i]``: its
    estimated seconds (None: unknown). The staleness order is never-snapshotted first,
    then by ``last`` ascending, ties by index. The first layer of that order is always
    taken; the next ones while at most ``max_layers`` are taken, their costs sum to at
    most ``budget_s`` (an unknown cost ends the prefix when there is a budget) and their
    bytes to at most ``max_bytes``. Taking a prefix (never skipping ahead to a cheaper
    layer) is what makes the rotation round-robin: each snapshot moves every layer not
    taken at least one place up, so none waits longer than ``len(last)`` snapshots.
    """
    if len(costs) != len(last) or (nbytes is not None and len(nbytes) != len(last)):
        raise ValueError("last, costs and nbytes must have one entry per layer")
    order = sorted(range(len(last)), key=lambda i: (-1 if last[i] is None else int(last[i]), i))  # type: ignore[arg-type]
    chosen: list[int] = []
    spent, held = 0.0, 0
    for i in order:
        cost = costs[i]
        size = 0 if nbytes is None else int(nbytes[i])
        if chosen:
            if max_layers is not None and len(chosen) >= max_layers:
                break
            if budget_s is not None and (cost is None or spent + cost > budget_s):
                break
            if max_bytes is not None and held + size > max_bytes:
                break
        chosen.append(i)
        spent += cost or 0.0
        held += size
    return sorted(chosen)


def snapshot_budget(max_overhead: float, step_s: float | None, steps: int) -> float | None:
    """Seconds one snapshot may cost: ``max_overhead * step_s * steps`` (None while ``step_s`` is unknown).

    ``steps``: the training steps the snapshot is paid from. With a fixed interval (or
    epochs) that is the steps since the previous snapshot, so the analysis stays within
    ``max_overhead`` of each interval's training time; under ``every_n_steps="auto"`` it
    is the global step, so no snapshot costs more than the whole budget earned so far
    (the first ones are small, later ones grow until the whole model fits, and the
    ``"auto"`` interval pays back what each one spent).
    """
    if step_s is None or not (step_s > 0) or not math.isfinite(step_s):
        return None
    return float(max_overhead) * float(step_s) * max(1, int(steps))


def _nbytes(mat: LayerMatrix) -> int:
    w = mat.weight
    return int(mat.num_slices) * int(mat.N) * int(mat.M) * int(getattr(w, "element_size", lambda: 4)())


class RotationPick:
    """One snapshot's choice, applied to the discovered matrices (:func:`~esdwatch.monitor.distributed.plan_snapshot`).

    Called once with all of the model's matrices (or, FSDP1, once per unit through
    :meth:`unit`); :meth:`finish` then records what the snapshot found and took.
    """

    def __init__(self, rotation: LayerRotation, budget_s: float | None, max_layers: int | None, max_bytes: int | None):
        self.rotation = rotation
        self.budget_s = budget_s
        self.max_layers = max_layers
        self.max_bytes = max_bytes
        self.found: dict[str, float] = {}  # every matrix found, name -> shape cost, in discovery order
        self._chosen: set[str] | None = None

    def __call__(self, mats: Sequence[LayerMatrix]) -> list[bool]:
        """Which of the model's matrices (all of them, in discovery order) to snapshot now."""
        rot = self.rotation
        self.found.update((m.name, layer_cost(m)) for m in mats)
        known = {m.name: layer_cost(m) for m in mats}
        idx = pick(
            [rot.last_step.get(m.name) for m in mats],
            [rot.estimate(m.name, known[m.name]) for m in mats],
            budget_s=self.budget_s,
            max_layers=self.max_layers,
            nbytes=[_nbytes(m) for m in mats],
            max_bytes=self.max_bytes,
        )
        keep = set(idx)
        return [i in keep for i in range(len(mats))]

    def unit(self, mats: Sequence[LayerMatrix]) -> list[bool]:
        """FSDP1: the matrices of one unit (each unit is unsharded in turn, so the whole list is not known
        before). The choice is made over the layers the previous snapshot found; layers new since then are
        all taken (the first snapshot of an FSDP1 model is therefore complete)."""
        rot = self.rotation
        self.found.update((m.name, layer_cost(m)) for m in mats)
        if self._chosen is None:
            names = list(rot.units)
            chosen = pick(
                [rot.last_step.get(n) for n in names],
                [rot.estimate(n) for n in names],
                budget_s=self.budget_s,
                max_layers=self.max_layers,
            )
            self._chosen = {names[i] for i in chosen}
        return [m.name in self._chosen or m.name not in rot.units for m in mats]

    def finish(self, step: int, taken: Sequence[str]) -> None:
        """The snapshot at ``step`` found :attr:`found` and copies ``taken``."""
        self.rotation.note_layers(self.found)
        self.rotation.taken(step, taken)


class LayerRotation:
    """Which layers were snapshotted when, what each one costs, and the next snapshot's choice."""

    def __init__(self, layers_per_snapshot: int | str | None, max_overhead: float):
        self.layers_per_snapshot = layers_per_snapshot
        self.max_overhead = max_overhead
        #: layer name -> the step it was last snapshotted (copied)
        self.last_step: dict[str, int] = {}
        #: layer name -> estimated analysis seconds (running average of its measured share)
        self.cost_s: dict[str, float] = {}
        #: layer name -> shape cost S * N * M**2 (the latest snapshot's layers, in discovery order)
        self.units: dict[str, float] = {}
        #: measured seconds per unit of shape cost (for layers without their own estimate)
        self.unit_s: float | None = None

    @property
    def active(self) -> bool:
        return self.layers_per_snapshot is not None

    def choice(self, steps_paid: int, step_s: float | None, max_bytes: int | None = None) -> RotationPick | None:
        """The selection for the next snapshot (None: every layer, no rotation).

        ``steps_paid`` and ``step_s`` give the ``"auto"`` budget (:func:`snapshot_budget`);
        ``max_bytes`` caps what one snapshot copies under ``"auto"``.
        """
        if not self.active:
            return None
        if self.layers_per_snapshot == "auto":
            budget = snapshot_budget(self.max_overhead, step_s, steps_paid)
            if budget is None:
                budget = 0.0  # nothing measured yet: one layer, the most stale
            return RotationPick(self, budget, None, max_bytes)
        return RotationPick(self, None, int(self.layers_per_snapshot), None)  # type: ignore[arg-type]

    def note_layers(self, units: Mapping[str, float]) -> None:
        """The model's current layers, name -> shape cost (forgets layers that are gone)."""
        self.units = dict(units)
        for gone in [n for n in self.last_step if n not in self.units]:
            del self.last_step[gone]
            self.cost_s.pop(gone, None)

    def taken(self, step: int, names: Sequence[str]) -> None:
        """``names`` were copied at ``step``."""
        for n in names:
            self.last_step[n] = int(step)

    def estimate(self, name: str, units: float | None = None) -> float | None:
        """Seconds the analysis of ``name`` is expected to take (None: nothing measured yet).

        Its own running estimate, else its shape cost (``units``, default the one noted) times
        the measured seconds per unit.
        """
        if name in self.cost_s:
            return self.cost_s[name]
        units = self.units.get(name) if units is None else units
        if self.unit_s is None or units is None:
            return None
        return self.unit_s * units

    def observe(self, names: Sequence[str], seconds: float) -> None:
        """One part of a finished snapshot: ``names`` were analysed together in ``seconds``."""
        names = [n for n in names if n in self.units]
        if not names or not (seconds >= 0) or not math.isfinite(seconds):
            return
        total_units = sum(self.units[n] for n in names)
        if total_units > 0:
            rate = seconds / total_units
            self.unit_s = rate if self.unit_s is None else self.unit_s + COST_EMA * (rate - self.unit_s)
        prior = [self.estimate(n) or self.units[n] or 1.0 for n in names]
        scale = seconds / sum(prior) if sum(prior) > 0 else 0.0
        for n, p in zip(names, prior):
            share = p * scale
            old = self.cost_s.get(n)
            self.cost_s[n] = share if old is None else old + COST_EMA * (share - old)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": dict(self.last_step), "cost_s": dict(self.cost_s), "unit_s": self.unit_s}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.last_step = {str(k): int(v) for k, v in dict(state.get("last_step") or {}).items()}
        self.cost_s = {str(k): float(v) for k, v in dict(state.get("cost_s") or {}).items()}
        unit = state.get("unit_s")
        self.unit_s = None if unit is None else float(unit)
