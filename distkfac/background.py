"""Decompositions off the critical path: one worker thread, and a side CUDA stream for CUDA tensors.

The preconditioner hands over a function of tensors it will not touch again (copies of the factors) and collects the
result one decomposition interval later. Collectives never run on the worker: only local maths does, so every rank
still issues the same collectives in the same order from its main thread.

- **CPU.** The worker is a Python thread; torch releases the GIL inside its kernels (``eigh``, ``cholesky``), so the
  decomposition runs beside the training step. On Linux the worker runs at the lowest priority (nice 19, a per-thread
  setting there), so it takes the cycles the step leaves idle (waits in collectives, other ranks' turns on an
  oversubscribed node) instead of slowing the step down; it still gets the CPU when nothing else wants it.
- **CUDA.** The worker enqueues the kernels on a side stream that first waits for the main stream (the copies must be
  made), and records an event when done. Collecting makes the main stream wait for that event, and marks the results
  as used on the main stream, so the caching allocator does not hand their memory out early.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

__all__ = ["Background", "InFlight"]

T = TypeVar("T")
Result = Mapping[Any, Sequence[torch.Tensor]]


@dataclass(eq=False)
class InFlight(Generic[T]):
    """A background computation started at ``step``, with the context needed to use its result (``context``)."""

    step: int
    context: T
    future: Future[tuple[Result, Any]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def finished(cls, step: int, context: T, result: Result) -> InFlight[T]:
        """An already finished computation (a checkpoint's saved result)."""
        future: Future[tuple[Result, Any]] = Future()
        future.set_result((result, None))
        return cls(step, context, future)


def _lowest_priority() -> None:
    """Run the calling thread at nice 19 where the OS allows a per-thread priority (Linux); elsewhere leave it."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        # Not allowed in some containers: the worker then keeps the process's priority.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Background:
    """Runs one computation at a time on a worker thread (on a side stream for CUDA)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}

    def submit(
        self, step: int, context: T, work: Callable[[], Result], inputs: Sequence[torch.Tensor], device: torch.device
    ) -> InFlight[T]:
        """Start ``work`` (which reads ``inputs`` only); its exceptions are raised by ``collect``."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="distkfac-decompose", initializer=_lowest_priority
            )
        if device.type != "cuda":
            return InFlight(step, context, self._executor.submit(lambda: (work(), None)), device)
        side = self._streams.setdefault(device, torch.cuda.Stream(device))
        inputs_ready = torch.cuda.Event()
        inputs_ready.record(torch.cuda.current_stream(device))

        def on_side_stream() -> tuple[Result, Any]:
            with torch.cuda.device(device), torch.cuda.stream(side):
                side.wait_event(inputs_ready)
                for tensor in inputs:
                    tensor.record_stream(side)  # freed by the main thread while the side stream may still read
                result = work()
                done = torch.cuda.Event()
                done.record(side)
            return result, done

        return InFlight(step, context, self._executor.submit(on_side_stream), device)

    @staticmethod
    def collect(job: InFlight[T]) -> Result:
        """Wait for ``job`` and return its result, ready for use on the current stream."""
        result, done = job.future.result()
        if done is not None:
            main = torch.cuda.current_stream(job.device)
            main.wait_event(done)
            for tensors in result.values():
                for tensor in tensors:
                    tensor.record_stream(main)
        return result
