"""Several ranks: snapshots decided together and results gathered at *exchanges*.

Every rank runs a Monitor (``rank``, ``world_size``; ``torch.distributed`` initialized, or
a :class:`~esdwatch.monitor.distributed.Comm`). The layers are shared out by cost
(:mod:`esdwatch.monitor.distributed`); each rank copies and analyses only its share, and
the parts meet at exchanges: one ``all_gather_object`` at points every rank reaches
together: the scheduled snapshot steps, every epoch end, the end of training and
checkpoints (Lightning saves checkpoints on every rank). At an exchange every rank
receives every finished part and publishes (in step order) each snapshot whose parts
are all in, so every rank holds the same latest summary; rank 0 alone writes the
records, ``distributed.jsonl`` (which rank analysed which layer) and the sinks, and runs
the alarm policy. A snapshot is taken only when every rank has a free slot (else skipped
on every rank); ``"auto"`` plans from the costs all ranks sent (the slowest rank sets the
pace) and, before the first cost is known, exchanges every
:data:`~esdwatch.monitor.schedule.AUTO_FIRST_STEP` steps, so the interval and the
snapshot steps are the same on every rank. Right after each exchange the stop decision
is reduced over the ranks, so a ``"stop"`` alarm on a layer analysed by any rank stops
every rank at the same step. Strict-mode errors travel with the exchange and are raised
on every rank. A snapshot's records reach ``records.jsonl`` at the first exchange after
its analysis, so the training thread never waits for another rank's analysis. After an
exception nothing is communicated: rank 0 writes what it has received and its own
finished parts (:meth:`DistributedCoordinator.flush_partial`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from esdwatch.errors import EsdwatchError
from esdwatch.monitor.coordinator import Coordinator, MonitorParts
from esdwatch.monitor.distributed import Comm
from esdwatch.monitor.schedule import AUTO_FIRST_STEP, SnapshotCosts
from esdwatch.monitor.snapshotter import Outcome
from esdwatch.monitor.worker import Result

log = logging.getLogger("esdwatch.monitor")

__all__ = ["DistributedCoordinator"]

Part = dict[str, Any]  # one rank's share of one snapshot: seq, rank, wall_time, reports, error, cpu_s, wall_s


class DistributedCoordinator(Coordinator):
    """Snapshots and results of several ranks, agreed at exchanges (module docstring)."""

    reduces_stop = True

    def __init__(self, parts: MonitorParts, comm: Callable[[], Comm], rank: int, world_size: int):
        super().__init__(parts)
        self.comm = comm
        self.rank = rank
        self.world_size = world_size
        self.attempts = 0  # snapshot decisions taken (identical on every rank)
        self._local: list[Part] = []  # this rank's finished parts, not yet exchanged
        self._parts: dict[int, dict[int, Part]] = {}  # seq -> rank -> part
        self._meta: dict[int, dict[str, Any]] = {}  # seq -> step, epoch, names, owners, costs, mode
        self._next = 0  # the next seq to publish
        self._peer_costs: list[Any] = []
        self._error: EsdwatchError | None = None  # a strict-mode error shared at the last exchange

    # ---- hooks
    def on_step(self, step: int, epoch: int) -> None:
        sched = self.p.schedule
        due = sched.step_due(step, first_auto_allowed=self.attempts == 0)
        # "auto" before the first cost is known: exchange every AUTO_FIRST_STEP steps to learn it
        probe = not due and sched.auto and sched.interval is None and self.attempts > 0 and step % AUTO_FIRST_STEP == 0
        if due:
            sched.last_due_step = step
        if due or probe:
            self.exchange(step, epoch, take=due, reason="step")

    def on_epoch_end(self, step: int, epoch: int, due: bool) -> None:
        self.exchange(step, epoch, take=due, reason="epoch")

    def take_now(self, step: int, epoch: int, reason: str, *, block: bool | None = None, stop: bool = True) -> bool:
        before = self.snapshots
        self.exchange(step, epoch, take=True, reason=reason, block=block, stop=stop)
        return self.snapshots > before

    def collect(self, res: Result) -> None:
        """This rank's part of a snapshot: sent at the next exchange, published when complete."""
        self.p.runtime.release(res)
        self._account(res)
        self._local.append(self._part(res.seq, res.wall_time, res.reports, res.error, res.cpu_s, res.wall_s))

    def finish(self, step: int, epoch: int, drain: Callable[[], bool], *, at_end: bool) -> None:
        # every rank: the final snapshot, then each drains its own worker, then the last exchanges
        if self.p.schedule.end_due(at_end, step):
            self.exchange(step, epoch, take=True, reason="end", block=True, stop=False)
        drain()
        self.exchange(step, epoch, take=False, reason="end", stop=False)
        if self.p.options.strict:  # errors raised while rank 0 published the last parts reach every rank
            self.exchange(step, epoch, take=False, reason="end", stop=False)

    def before_checkpoint(self, drain: Callable[[], bool], running: bool) -> None:
        if running:  # collective: drain here, then one exchange so that rank 0 writes every part first
            drain()
            self.exchange(
                self.p.schedule.last_step, self.p.schedule.last_epoch, take=False, reason="checkpoint", stop=False
            )

    def raise_pending(self) -> None:
        # only errors shared at an exchange: every rank raises the same one at the same point
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def planning_costs(self) -> SnapshotCosts:
        return SnapshotCosts.slowest(self._peer_costs)

    def load_counts(self, snapshots: int, skipped: int) -> None:
        self.snapshots = snapshots
        self.attempts = snapshots + skipped

    # ---- the exchange
    def exchange(
        self, step: int, epoch: int, *, take: bool, reason: str, block: bool | None = None, stop: bool = True
    ) -> None:
        """One exchange, on every rank at the same point.

        Sends this rank's finished parts, publishes every snapshot now complete, updates
        the auto interval, takes (or skips, on every rank) the snapshot when ``take``, and
        reduces the stop decision when ``stop``.
        """
        comm = self.comm()
        runtime = self.p.runtime
        runtime.ensure()
        for res in runtime.poll():
            self.collect(res)
        if take and self._block(block) and not runtime.has_room(self._next_nbytes):
            runtime.wait_for_room(self._next_nbytes, self.p.options.execution.drain_timeout, self.collect)
        err = self.p.faults.take_pending()
        payload = {
            "rank": self.rank,
            "parts": self._local,
            "free": runtime.has_room(self._next_nbytes),
            "shortage": runtime.room_shortage(self._next_nbytes),
            "cost": self.p.budget.costs().as_tuple(),
            "error": None if err is None else str(err),
        }
        t0 = time.perf_counter()
        gathered = comm.all_gather_object(payload)
        self._local = []
        self.p.stats["exchanges"] += 1
        self.p.stats["exchange_s"] += time.perf_counter() - t0
        for p in gathered:
            for part in p["parts"]:
                self._parts.setdefault(int(part["seq"]), {})[int(p["rank"])] = part
        self._publish_ready()
        self._peer_costs = [p["cost"] for p in gathered]
        self._refresh_interval()
        if take:
            self.attempts += 1
            if all(p["free"] for p in gathered):
                self._take(step, epoch, reason)
            else:
                full = [p for p in gathered if not p["free"]]
                self._count_skip(step, "; ".join(f"rank {p['rank']}: {p['shortage']}" for p in full))
        if stop:
            self.p.stop.sync(comm.any)
        errors = [f"rank {p['rank']}: {p['error']}" for p in gathered if p["error"]]
        if errors and self._error is None:
            self._error = EsdwatchError("; ".join(errors))

    def _take(self, step: int, epoch: int, reason: str) -> None:
        """Discover, share out, materialize and submit this rank's part (every rank)."""
        if self.p.schedule.last_snapshot_step == step:
            return
        model, root = self.p.model_and_root()
        _, pool = self.p.runtime.ensure()
        seq = self.seq
        wall_time = time.time()
        taken = self.p.snapshotter.take(
            model, root, step, epoch, seq, pool, self.p.runtime.submit, self._rotation(step)
        )
        if taken.plan is not None:
            self.p.outputs.skipped_layers(step, taken.plan.skipped)
        if taken.outcome is Outcome.EMPTY:
            self._empty(step)
        if taken.outcome in (Outcome.EMPTY, Outcome.FAILED) or taken.plan is None:
            return
        self.seq += 1
        plan = taken.plan
        self._meta[seq] = {
            "step": step,
            "epoch": epoch,
            "names": plan.names,
            "owners": plan.owners,
            "costs": plan.costs,
            "mode": plan.mode,
            "reason": reason,
        }
        if taken.outcome is not Outcome.SUBMITTED:  # nothing to analyse here, or the copy failed
            self._local.append(self._part(seq, wall_time, [], taken.error))
        self._took(step, seq, taken)

    def _part(
        self, seq: int, wall_time: float, reports: list, error: str | None, cpu_s: float = 0.0, wall_s: float = 0.0
    ) -> Part:
        return {
            "seq": seq,
            "rank": self.rank,
            "wall_time": wall_time,
            "reports": list(reports),
            "error": error if (error and not reports) else None,
            "cpu_s": cpu_s,
            "wall_s": wall_s,
        }

    # ---- publishing complete snapshots
    def _publish_ready(self) -> None:
        """Publish, in order, every snapshot whose parts from all ranks have arrived."""
        while len(self._parts.get(self._next, ())) >= self.world_size:
            seq = self._next
            self._next += 1
            self._publish(seq, self._meta.pop(seq, None), self._parts.pop(seq))

    def _publish(self, seq: int, meta: dict[str, Any] | None, parts: dict[int, Part]) -> None:
        if meta is None:
            return
        t0 = time.perf_counter()
        order = {n: i for i, n in enumerate(meta["names"])}
        reports = sorted(
            (rep for rk in sorted(parts) for rep in parts[rk]["reports"]), key=lambda r: order.get(r.name, len(order))
        )
        wall_time = parts[0]["wall_time"] if 0 in parts else min(p["wall_time"] for p in parts.values())
        step, epoch = int(meta["step"]), int(meta["epoch"])
        for rk in sorted(parts):  # every rank, same parts, same order: the same per-layer costs
            self._observe([r.name for r in parts[rk]["reports"]], parts[rk]["cpu_s"], parts[rk]["wall_s"])
        if self.p.writer:
            self._report_parts(step, meta, parts)
        self.p.publisher.publish(step, self._records(step, epoch, wall_time, reports))
        self.p.stats["handle_s"] += time.perf_counter() - t0

    def _report_parts(self, step: int, meta: dict[str, Any], parts: dict[int, Part]) -> None:
        """The writer logs failed and missing parts and writes who analysed what (distributed.jsonl)."""
        for rk, p in sorted(parts.items()):
            if p["error"]:
                log.error(
                    "esdwatch: rank %d's part of the snapshot at step %d failed: %s",
                    rk,
                    step,
                    str(p["error"]).strip().splitlines()[-1],
                )
        missing = [r for r in range(self.world_size) if r not in parts]
        if missing:
            log.warning(
                "esdwatch: the snapshot at step %d is written without the layers of rank(s) %s (never received)",
                step,
                missing,
            )
        by_rank = []
        for rk in range(self.world_size):
            mine = [i for i, o in enumerate(meta["owners"]) if o == rk]
            p = parts.get(rk, {})
            by_rank.append(
                {
                    "rank": rk,
                    "layers": len(mine),
                    "cost": float(sum(meta["costs"][i] for i in mine)),
                    "analysis_wall_s": p.get("wall_s"),
                    "analysis_cpu_s": p.get("cpu_s"),
                    "received": rk in parts,
                }
            )
        self.p.outputs.distributed(
            {
                "global_step": step,
                "segment": self.p.outputs.segment,
                "world_size": self.world_size,
                "mode": meta["mode"],
                "owners": dict(zip(meta["names"], meta["owners"])),
                "ranks": by_rank,
            }
        )

    def flush_partial(self) -> None:
        """No more exchanges (exception, abort): the writer publishes what it has, the others warn."""
        for part in self._local:
            self._parts.setdefault(int(part["seq"]), {})[self.rank] = part
        unsent, self._local = len(self._local), []
        if not self.p.writer:
            if unsent:
                log.warning(
                    "esdwatch: rank %d: %d analysed snapshot part(s) could not reach rank 0 (training ended "
                    "without an exchange after them)",
                    self.rank,
                    unsent,
                )
            self._parts.clear()
            return
        for seq in sorted(self._parts):
            parts = self._parts.pop(seq)
            try:
                self._publish(seq, self._meta.pop(seq, None), parts)
            except Exception:  # never mask the original exception
                log.exception("esdwatch: error while flushing the snapshot %d", seq)
        self._parts.clear()
