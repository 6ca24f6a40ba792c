"""When a snapshot is taken: the schedule (a pure decision) and the overhead budget of ``"auto"``.

Schedule
--------
Exactly one of ``every_n_steps`` (an int, or ``"auto"``) and ``every_n_epochs``; with
neither, ``"auto"``. ``every_n_steps=n`` snapshots the first step that reaches each
multiple of n (``global_step`` = optimizer steps taken, so gradient accumulation never
duplicates a step). ``at_start`` adds step 0 (the initialization baseline, fresh runs
only), ``at_end`` the final weights (skipped when the last step was already snapshotted).
:meth:`Schedule.step_due` and :meth:`Schedule.epoch_due` decide from the options and the
position alone, like Lightning's ``EarlyStopping._evaluate_stopping_criteria``.

The ``"auto"`` interval
-----------------------
``"auto"`` measures what each snapshot costs the training and spaces snapshots so that
this cost stays within ``max_overhead`` of the training time (:class:`OverheadBudget`).
The cost is measured, not guessed: the step time while no analysis runs is tracked, and
the time the steps lose while an analysis runs (the measured slowdown, which on a busy
machine can exceed the worker's CPU seconds) is charged to that snapshot; a snapshot
costs the larger of that slowdown and the worker's CPU seconds plus the copy. Whatever
was spent beyond the budget so far (the first, measuring snapshot at step
:data:`AUTO_FIRST_STEP`; a worker process's start-up) is paid back by waiting longer, so
the total converges to ``max_overhead``. The interval is also kept longer than
``keepup`` x the worker's wall time per analysis, so the worker never falls behind
(:func:`auto_interval`). Measurements: ``experiments/results/bench_overhead.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from esdwatch.monitor.rotation import LayerRotation, RotationPick

log = logging.getLogger("esdwatch.monitor")

__all__ = ["AUTO_FIRST_STEP", "OverheadBudget", "Schedule", "SnapshotCosts", "auto_interval"]

#: first snapshot step of every_n_steps="auto" when there is no at_start baseline
AUTO_FIRST_STEP = 10
#: an auto interval is logged again only when it differs from the last one logged by more than this
AUTO_HYSTERESIS = 0.25
#: weight of a new measurement in the running averages
EMA = 0.2
#: a step this many times longer than usual is an epoch end, validation or checkpoint, not a step
OUTLIER_FACTOR = 10
#: ... unless that many come in a row: then the step time itself has changed
OUTLIER_RUN = 5


def auto_interval(
    cost_s: float, wall_s: float, step_s: float, max_overhead: float, keepup: float = 1.25, debt_s: float = 0.0
) -> int:
    """Steps between snapshots so that analysis stays within ``max_overhead`` of training.

    ``cost_s``: what one snapshot costs the training (the larger of the worker's CPU
    seconds plus the snapshot copy, and the measured slowdown of the training steps while
    it ran); ``wall_s``: the worker's wall time per analysis; ``step_s``: training seconds
    per step (without analysis running); ``debt_s``: overhead spent so far beyond the
    budget (negative: under it). The interval is the larger of
    ``(cost_s + debt_s) / (max_overhead * step_s)`` (the budget, paying back any debt) and
    ``keepup * wall_s / step_s`` (the worker finishes before the next snapshot is due).
    """
    if not (step_s > 0) or not math.isfinite(step_s):
        raise ValueError(f"step_s must be a positive number, got {step_s}")
    debt = float(debt_s) if math.isfinite(float(debt_s)) else 0.0
    budget = max(0.0, cost_s + debt) / (max_overhead * step_s)
    catch_up = keepup * wall_s / step_s
    return max(1, int(math.ceil(max(budget, catch_up))))


@dataclass(frozen=True)
class SnapshotCosts:
    """What ``"auto"`` plans with: cost and worker wall time per snapshot, seconds per step, debt."""

    cost_s: float | None = None
    wall_s: float | None = None
    step_s: float | None = None
    debt_s: float = 0.0

    @classmethod
    def slowest(cls, per_rank: Sequence[SnapshotCosts | Sequence[Any] | None]) -> SnapshotCosts:
        """Several ranks: the largest cost, wall time and debt (the slowest rank sets the pace), the smallest step."""
        costs = [SnapshotCosts(*c) if not isinstance(c, SnapshotCosts) else c for c in per_rank if c]
        known = [c for c in costs if c.cost_s is not None]
        steps = [c.step_s for c in costs if c.step_s]
        if not known or not steps:
            return cls()
        return cls(
            max(c.cost_s for c in known if c.cost_s is not None),  # known: all not None
            max((c.wall_s or 0.0) for c in known),
            min(steps),
            max(float(c.debt_s or 0.0) for c in known),
        )

    def as_tuple(self) -> tuple[float | None, float | None, float | None, float]:
        """Plain values, for exchanging between ranks."""
        return self.cost_s, self.wall_s, self.step_s, self.debt_s


class OverheadBudget:
    """Measures the training step time and what each snapshot costs it (the ``"auto"`` budget)."""

    def __init__(self, max_overhead: float):
        self.max_overhead = max_overhead
        self.step_s: float | None = None  # seconds per step (all steps, outliers excluded)
        self.step_idle: float | None = None  # seconds per step while no analysis runs
        self.cost_ema: float | None = None  # what a snapshot costs the training
        self.wall_ema: float | None = None  # the worker's wall time per snapshot
        self.spent = 0.0  # overhead spent so far (each snapshot's cost, a worker start-up)
        self.steps_timed = 0  # training steps timed (the budget accrues with them)
        self._busy = False  # an analysis (or a worker start-up) runs during the current step
        self._starting = False  # ... and it is the worker process starting
        self._excess = 0.0  # training seconds lost while the current analysis ran
        self._outliers = 0
        self._prev: tuple[int, float] | None = None

    @property
    def busy(self) -> bool:
        return self._busy

    def note_busy(self, busy: bool, starting: bool) -> None:
        """Whether analysis work (``starting``: only a worker's start-up) runs alongside the next step."""
        self._busy = busy
        self._starting = starting

    def time_step(self, global_step: int, now: float) -> None:
        """Time the step(s) since the previous call; split idle and busy steps.

        Steps with no analysis running give the idle step time; during an analysis (or a
        worker process's start-up) the time beyond it is what the analysis cost the
        training: that is budgeted, measured, not the worker's CPU time alone.
        """
        prev, self._prev = self._prev, (global_step, now)
        if prev is None or global_step <= prev[0]:
            return
        n = global_step - prev[0]
        dt = (now - prev[1]) / n
        if self.step_s is None:
            self.step_s = dt
        elif dt < OUTLIER_FACTOR * self.step_s:
            self.step_s += EMA * (dt - self.step_s)
            self._outliers = 0
        else:
            self._outliers += 1
            if self._outliers < OUTLIER_RUN:
                return
            self.step_s, self.step_idle, self._outliers = dt, None, 0
        self.steps_timed += n
        if not self._busy:
            self.step_idle = dt if self.step_idle is None else self.step_idle + EMA * (dt - self.step_idle)
        elif self.step_idle is not None:
            excess = (dt - self.step_idle) * n
            if self._starting:
                self.spent += max(0.0, excess)  # a worker process's start-up: paid from the budget
            else:
                self._excess += excess

    def charge(self, cpu_s: float, copy_s: float, wall_s: float) -> None:
        """A finished analysis: its cost is the larger of its CPU time (+ the copy) and the slowdown it caused."""
        impact, self._excess = self._excess, 0.0
        cost = max(cpu_s + copy_s, impact)
        self.spent += cost
        self.cost_ema = cost if self.cost_ema is None else self.cost_ema + EMA * (cost - self.cost_ema)
        self.wall_ema = wall_s if self.wall_ema is None else self.wall_ema + EMA * (wall_s - self.wall_ema)

    def costs(self) -> SnapshotCosts:
        """What was measured here, with the debt: overhead spent beyond ``max_overhead`` of the timed steps."""
        step_s = self.step_idle if self.step_idle is not None else self.step_s
        debt = 0.0 if step_s is None else self.spent - self.max_overhead * self.steps_timed * step_s
        return SnapshotCosts(self.cost_ema, self.wall_ema, step_s, debt)

    def state_dict(self) -> dict[str, Any]:
        return {"cost_ema": self.cost_ema, "wall_ema": self.wall_ema, "step_s": self.step_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cost_ema, self.wall_ema, self.step_s = state.get("cost_ema"), state.get("wall_ema"), state.get("step_s")


class Schedule:
    """The position in training and the decision whether a snapshot is due (no I/O, no clock)."""

    def __init__(
        self,
        every_n_steps: int | str | None,
        every_n_epochs: int | None,
        max_overhead: float,
        layers_per_snapshot: int | str | None = None,
    ):
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.max_overhead = max_overhead
        #: steps between snapshots (the chosen one under "auto"; None before it is known)
        self.interval: int | None = every_n_steps if isinstance(every_n_steps, int) else None
        self.last_step = 0  # the last global step handled
        self.last_epoch = 0
        self.last_snapshot_step: int | None = None
        self.auto_base = 0  # under "auto": the step the interval counts from
        self.last_due_step: int | None = None
        self._logged_interval: int | None = None
        #: which layers each snapshot takes (all, unless layers_per_snapshot is set)
        self.rotation = LayerRotation(layers_per_snapshot, max_overhead)

    @property
    def auto(self) -> bool:
        return self.every_n_steps == "auto"

    def step_due(self, step: int, first_auto_allowed: bool) -> bool:
        """Whether ``step`` (later than :attr:`last_step`) is a scheduled snapshot step.

        ``first_auto_allowed``: under ``"auto"`` before the interval is known, whether the
        first, measuring snapshot may be taken now (the caller knows whether one is already
        in flight or a worker is still starting); it is taken from :data:`AUTO_FIRST_STEP` on.
        """
        if self.every_n_epochs is not None:
            return False
        if self.auto:
            if self.interval is None:
                return first_auto_allowed and step >= AUTO_FIRST_STEP
            return step >= self.auto_base + self.interval
        n = int(self.every_n_steps)  # type: ignore[arg-type]  # neither epochs nor auto: an int
        return step > 0 and step // n > self.last_step // n

    def epoch_due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) is a scheduled snapshot."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def start_due(self, at_start: bool, global_step: int, resuming: bool) -> bool:
        """The ``at_start`` baseline: step 0 of a fresh run that has no snapshot yet."""
        return at_start and global_step == 0 and not resuming and self.last_snapshot_step is None

    def end_due(self, at_end: bool, step: int) -> bool:
        """The ``at_end`` snapshot, unless the last step was already snapshotted."""
        return at_end and self.last_snapshot_step != step

    def taken(self, step: int) -> None:
        self.last_snapshot_step = step
        self.auto_base = step

    def skipped(self, step: int) -> None:
        self.auto_base = step  # "auto" waits a whole interval again

    def rotation_choice(self, step: int, costs: SnapshotCosts, max_bytes: int | None) -> RotationPick | None:
        """The layers of a snapshot at ``step`` (None: all). ``"auto"`` pays each snapshot from the steps
        since the previous one (under ``every_n_steps="auto"``: from all steps so far; see
        :func:`~esdwatch.monitor.rotation.snapshot_budget`)."""
        paid = step if self.auto or self.last_snapshot_step is None else step - self.last_snapshot_step
        return self.rotation.choice(paid, costs.step_s, max_bytes)

    def plan_interval(self, costs: SnapshotCosts, *, log_changes: bool) -> None:
        """Under ``"auto"``: follow the latest measurements (logged when the interval changes by > 25%)."""
        if not self.auto or costs.cost_s is None or costs.step_s is None or costs.step_s <= 0:
            return
        new = auto_interval(costs.cost_s, costs.wall_s or 0.0, costs.step_s, self.max_overhead, debt_s=costs.debt_s)
        self.interval = new
        old = self._logged_interval
        if not log_changes or (old is not None and abs(new - old) <= AUTO_HYSTERESIS * old):
            return
        self._logged_interval = new
        log.info(
            "esdwatch: every_n_steps='auto' -> %d steps (analysis costs %.3g s per snapshot, %.3g s wall; "
            "training %.3g s per step; budget %.0f%%, %+.3g s spent beyond it so far)",
            new,
            costs.cost_s,
            costs.wall_s or 0.0,
            costs.step_s,
            100 * self.max_overhead,
            costs.debt_s,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "last_snapshot_step": self.last_snapshot_step,
            "interval": self.interval,
            **({"rotation": self.rotation.state_dict()} if self.rotation.active else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state.get("last_step", 0))
        self.last_epoch = int(state.get("last_epoch", 0))
        lss = state.get("last_snapshot_step")
        self.last_snapshot_step = None if lss is None else int(lss)
        self.auto_base = self.last_snapshot_step or 0
        if self.auto:
            self.interval = state.get("interval")
        self.rotation.load_state_dict(state.get("rotation"))
