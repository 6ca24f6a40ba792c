"""Copy the selected weight matrices out of the live model: the training thread's only cost.

A snapshot turns the :class:`~esdwatch.engine.layers.LayerMatrix` views that
:func:`~esdwatch.engine.layers.find_layers` returns (views of the live parameters) into
:class:`LayerMatrix` objects whose ``weight`` is a private copy the analysis worker may
read while training goes on. The copies live in reusable buffers:

* :class:`BufferPool` holds up to ``slots`` sets of buffers (one set per snapshot in
  flight, made on demand). A slot is acquired for a snapshot and released when its
  results have been handed back, so a buffer is never overwritten while the worker reads
  it; one idle set is kept, so steady-state snapshots allocate nothing and a burst's extra
  sets are freed when it is over.
* Buffers keep the source's memory layout when it is dense (a transposed or permuted
  view of a contiguous parameter is copied with one ``memcpy``-speed ``copy_``, not a
  strided gather), the source's dtype (a bfloat16 weight is copied as bfloat16: half
  the bytes, and the analysis knows the precision the weights were stored in) and its
  logical shape ``(S, N, M)``.
* Where the copy goes (``target``):

  ``"cpu"``
      CPU weights: plain CPU buffers. CUDA weights: pinned host buffers filled by
      non-blocking device-to-host copies on a side stream; the training stream is
      made to wait for that side stream on the GPU (``wait_stream``, no host sync) so
      the next optimizer step cannot overwrite a weight before it is copied, and the
      worker waits on a CUDA event before reading (:meth:`Snapshot.wait`).
  ``"shared"``
      Like ``"cpu"`` but in shared memory (``Tensor.share_memory_()``) so that a
      ``torch.multiprocessing`` worker process maps the same pages instead of
      receiving pickled copies. CUDA weights are copied synchronously (a pinned buffer
      cannot be shared across processes).
  ``"device"``
      A clone on the weight's own device made on a side stream: for analysis on the
      GPU (``AnalysisConfig.device="cuda"``). The worker runs on the same side stream
      (:attr:`Snapshot.stream`), after the clone, never on the training stream.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from esdwatch.engine.layers import LayerMatrix

__all__ = ["BufferPool", "Snapshot", "Target", "take_snapshot"]

Target = Literal["cpu", "shared", "device"]
TARGETS: tuple[str, ...] = ("cpu", "shared", "device")


def _dense_layout(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill exactly ``numel`` consecutive slots in some dim order.

    True for contiguous tensors and any transpose/permute of one (what ``find_layers``
    returns for dense and pooled-conv weights); False for slices such as ``w[:, :, i, j]``.
    """
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _layout_key(t: torch.Tensor) -> tuple:
    strides = tuple(t.stride()) if _dense_layout(t) else None
    return (tuple(t.shape), strides, t.dtype)


@dataclass
class Snapshot:
    """The copied matrices of one snapshot and what the reader must wait for."""

    mats: list[LayerMatrix]
    slot: int
    events: list = field(default_factory=list)  # torch.cuda.Event per device, recorded after the copies
    stream: Any = None  # the side stream the copies (and a "device" analysis) run on
    nbytes: int = 0

    def wait(self) -> None:
        """Block the calling (worker) thread until the copies are complete."""
        for event in self.events:
            event.synchronize()


@dataclass
class _Slot:
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    busy: bool = False


class BufferPool:
    """``slots`` reusable sets of snapshot buffers (see module docstring).

    Thread-safe: :meth:`acquire` and :meth:`release` may be called from any thread.
    """

    def __init__(self, slots: int = 1, target: Target = "cpu"):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.max_slots = slots
        self._slots = [_Slot()]  # more are made on demand, up to max_slots
        self._lock = threading.Lock()
        self._streams: dict[Any, Any] = {}
        self.allocations = 0  # buffers allocated so far (reuse keeps this flat)

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def free_slots(self) -> int:
        with self._lock:
            return self.max_slots - sum(s.busy for s in self._slots)

    def acquire(self) -> int | None:
        """Index of a free slot, now marked busy; None when every slot is in use."""
        with self._lock:
            for i, s in enumerate(self._slots):
                if not s.busy:
                    s.busy = True
                    return i
            if len(self._slots) < self.max_slots:
                self._slots.append(_Slot(busy=True))
                return len(self._slots) - 1
        return None

    def release(self, slot: int) -> None:
        """The slot's snapshot is analysed; its buffers are kept for reuse unless another idle slot has some."""
        with self._lock:
            s = self._slots[slot]
            s.busy = False
            if any(o is not s and not o.busy and o.buffers for o in self._slots):
                s.buffers.clear()  # a burst is over: keep one idle set of buffers, not one per slot

    def clear(self) -> None:
        """Drop every buffer (e.g. at the end of training)."""
        with self._lock:
            for s in self._slots:
                s.buffers.clear()

    # ------------------------------------------------------------------ buffers

    def _side_stream(self, device: torch.device):
        stream = self._streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams[device] = stream
        return stream

    def _buffer(self, slot: int, key: str, src: torch.Tensor) -> torch.Tensor:
        bufs = self._slots[slot].buffers
        on_device = self.target == "device" and src.device.type != "cpu"
        device = src.device if on_device else torch.device("cpu")
        buf = bufs.get(key)
        if buf is not None and _layout_key(buf) == _layout_key(src) and buf.device == device:
            return buf
        pin = self.target == "cpu" and src.device.type == "cuda"
        if _dense_layout(src):
            buf = torch.empty_strided(
                tuple(src.shape), tuple(src.stride()), dtype=src.dtype, device=device, pin_memory=pin
            )
        else:
            buf = torch.empty(tuple(src.shape), dtype=src.dtype, device=device, pin_memory=pin)
        if self.target == "shared":
            buf.share_memory_()
        bufs[key] = buf
        self.allocations += 1
        return buf

    def copy(self, slot: int, mats: Sequence[LayerMatrix], private: Sequence[bool] | None = None) -> Snapshot:
        """Copy every matrix of ``mats`` into the buffers of ``slot`` (which must be held).

        Buffers of layers absent from ``mats`` are dropped, so a removed layer frees its
        memory at the next snapshot. ``private[i]`` marks a weight that is already a
        private copy (a full matrix gathered from shards, see :mod:`esdwatch.monitor.distributed`):
        on CPU it becomes the slot's buffer as it is (moved to shared memory for the
        ``"shared"`` target) instead of being copied once more.
        """
        out: list[LayerMatrix] = []
        cuda_devices: set[torch.device] = set()
        nbytes = 0
        keep: set[str] = set()
        stream = None
        with torch.no_grad():
            for idx, mat in enumerate(mats):
                key = mat.name if mat.name not in keep else f"{mat.name}#{idx}"
                keep.add(key)
                src = mat.weight.detach()
                if private is not None and private[idx] and src.device.type == "cpu" and self.target != "device":
                    if self.target == "shared":
                        src.share_memory_()
                    self._slots[slot].buffers[key] = src
                    nbytes += src.numel() * src.element_size()
                    out.append(dataclasses.replace(mat, weight=src))
                    continue
                buf = self._buffer(slot, key, src)
                if src.device.type == "cuda" and self.target != "shared":
                    stream = self._side_stream(src.device)
                    if src.device not in cuda_devices:
                        # the copies must see every kernel queued so far on the training stream
                        stream.wait_stream(torch.cuda.current_stream(src.device))
                        cuda_devices.add(src.device)
                    with torch.cuda.stream(stream):
                        buf.copy_(src, non_blocking=True)
                    src.record_stream(stream)  # its memory is not reused before the copy ran
                else:
                    buf.copy_(src)
                nbytes += buf.numel() * buf.element_size()
                out.append(dataclasses.replace(mat, weight=buf))
        bufs = self._slots[slot].buffers
        for stale in [k for k in bufs if k not in keep]:
            del bufs[stale]
        return Snapshot(mats=out, slot=slot, events=self._fence(cuda_devices), stream=stream, nbytes=nbytes)

    def _fence(self, cuda_devices: set[torch.device]) -> list[Any]:
        """Make later training kernels wait (on the GPU) for the side-stream copies; events the worker waits on."""
        events = []
        for dev in cuda_devices:
            side = self._side_stream(dev)
            torch.cuda.current_stream(dev).wait_stream(side)  # the optimizer step cannot overwrite a weight first
            event = torch.cuda.Event()
            event.record(side)
            events.append(event)
        return events


def take_snapshot(
    mats: Sequence[LayerMatrix], pool: BufferPool, private: Sequence[bool] | None = None
) -> Snapshot | None:
    """Acquire a slot of ``pool`` and copy ``mats`` into it (see :meth:`BufferPool.copy`); None when no slot is free.

    If the copy raises, the slot is released before the exception propagates.
    """
    slot = pool.acquire()
    if slot is None:
        return None
    try:
        return pool.copy(slot, mats, private)
    except BaseException:
        pool.release(slot)
        raise
