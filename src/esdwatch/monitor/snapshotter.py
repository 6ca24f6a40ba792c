"""Taking a snapshot: discover the watched matrices, share them out, copy this rank's share, submit it.

This is all a snapshot costs the training thread. The layers are re-discovered at every
snapshot (:func:`~esdwatch.monitor.distributed.plan_snapshot`, over
:func:`esdwatch.engine.layers.find_layers`), so added, removed or replaced layers appear
and disappear cleanly; with several ranks they are shared out by cost (identical on
every rank), sharded weights (FSDP1 units, FSDP2 DTensors) are materialized on their
owner only. This rank's matrices are copied into a free slot of the
:class:`~esdwatch.monitor.snapshot.BufferPool` and submitted to the executor as one
:class:`~esdwatch.monitor.worker.Job`. One rank is the special case ``world_size=1``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from esdwatch.engine.analyzer import AnalysisConfig
from esdwatch.monitor.distributed import ShardPlan, plan_snapshot
from esdwatch.monitor.faults import Faults
from esdwatch.monitor.rotation import RotationPick
from esdwatch.monitor.snapshot import BufferPool, take_snapshot
from esdwatch.monitor.worker import Job
from esdwatch.schema import SkippedLayer

log = logging.getLogger("esdwatch.monitor")

__all__ = ["Snapshotter", "Taken", "Outcome"]


class Outcome(enum.Enum):
    SUBMITTED = "submitted"  # this rank's share is copied and in the worker
    NOTHING_OWNED = "nothing owned"  # every matrix belongs to another rank
    COPY_FAILED = "copy failed"  # copying this rank's share failed (logged); the others go on
    EMPTY = "empty"  # the model has no analyzable matrix now
    FAILED = "failed"  # the layers could not be discovered (logged)


@dataclass
class Taken:
    """What one snapshot attempt did, and its plan (names, owners, costs), identical on every rank."""

    outcome: Outcome
    plan: ShardPlan | None = None
    copy_s: float = 0.0  # seconds the training thread spent on it
    nbytes: int = 0
    error: str | None = None
    skipped_reasons: list[str] = field(default_factory=list)


class Snapshotter:
    """Plans, copies and submits snapshots of one model (the training thread's side)."""

    def __init__(
        self, find_layers_kwargs: dict[str, Any], config: AnalysisConfig, faults: Faults, *, rank: int, world_size: int
    ):
        self.find_layers_kwargs = find_layers_kwargs
        self.config = config
        self.faults = faults
        self.rank = rank
        self.world_size = world_size
        #: "replicated", "dtensor" or "fsdp1": how the weights of the last snapshot were held
        self.mode: str | None = None
        #: the latest snapshot's owner rank of each layer
        self.owners: dict[str, int] = {}
        #: the matrices the latest snapshot found but did not analyse, and why
        self.skipped_layers: list[SkippedLayer] = []

    def take(
        self,
        model: torch.nn.Module,
        root: torch.nn.Module | None,
        step: int,
        epoch: int,
        seq: int,
        pool: BufferPool,
        submit: Callable[[Job], None],
        select: RotationPick | None = None,
    ) -> Taken:
        """Discover, share out, copy and submit (on every rank at the same point when distributed).

        The caller has checked that ``pool`` has a free slot. ``select``: this snapshot's
        rotating subset of the layers (:mod:`esdwatch.monitor.rotation`; None: all).
        """
        t0 = time.perf_counter()
        try:
            plan = plan_snapshot(model, self.find_layers_kwargs, self.rank, self.world_size, root=root, select=select)
        except Exception as exc:  # a model find_layers cannot walk: skip, never break training
            self.faults.internal_error("discovering the layers", step, exc)
            return Taken(Outcome.FAILED)
        if select is not None:
            select.finish(step, plan.names)
        self._note_mode(plan)
        self.skipped_layers = list(plan.skipped)
        if not plan.names:
            self._warn_empty(plan, step)
            return Taken(Outcome.EMPTY, plan)
        self._log_first(plan)
        self.owners = plan.owner_of()
        owned = [m for _, m in plan.owned]
        if not owned:
            return Taken(Outcome.NOTHING_OWNED, plan, time.perf_counter() - t0)
        try:
            snap = take_snapshot(owned, pool, plan.private)
        except Exception as exc:  # e.g. out of (pinned) memory: skip this snapshot
            self.faults.internal_error("copying the weights", step, exc)
            return Taken(
                Outcome.COPY_FAILED, plan, time.perf_counter() - t0, error=f"copying the weights failed: {exc}"
            )
        if snap is None:  # the caller checked that a slot is free: cannot happen
            return Taken(Outcome.COPY_FAILED, plan, time.perf_counter() - t0, error="no free snapshot slot")
        job = Job(seq, step, epoch, time.time(), snap.mats, self.config, slot=snap.slot, snapshot=snap)
        submit(job)
        return Taken(Outcome.SUBMITTED, plan, time.perf_counter() - t0, snap.nbytes)

    def _note_mode(self, plan: ShardPlan) -> None:
        if plan.mode != self.mode:
            self.mode = plan.mode
            if self.world_size > 1 and self.rank == 0:
                log.info("esdwatch: %d ranks share the analysis (%s weights)", self.world_size, plan.mode)

    def _log_first(self, plan: ShardPlan) -> None:
        if self.faults.first_time("layers_logged") and self.rank == 0:
            sk = plan.skipped
            log.info(
                "esdwatch: watching %d matrices (%d skipped%s)",
                len(plan.names),
                len(sk),
                ": " + "; ".join(f"{s.name}: {s.reason}" for s in sk[:10]) if sk else "",
            )

    def _warn_empty(self, plan: ShardPlan, step: int) -> None:
        sk = plan.skipped
        why = "; ".join(f"{s.name}: {s.reason}" for s in sk[:5]) + (" ..." if len(sk) > 5 else "")
        self.faults.warn_once(
            "no_layers",
            f"esdwatch: no analyzable layer in the model at step {step} "
            f"({len(sk)} candidate(s) skipped{': ' + why if why else ''}); nothing is recorded until one "
            f"appears. Adjust layers/exclude/types or min_evals={self.find_layers_kwargs.get('min_evals')}.",
        )
