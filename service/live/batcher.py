"""One decode loop per model: the steps of all its live streams, run together.

A step is one normalized feature buffer; all steps of a preset have the same shape, so the
steps that are waiting when the loop comes round run as one batch, without padding, in the
inference executor that file requests use too. A stream awaits its own steps in order; the
loop never waits for company (a stream's step is due now), it just takes what is queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.errors import ServiceUnavailable
from service.live.buffered import BufferedCtcStream
from service.models import Recognizer

MAX_STEPS_PER_BATCH = 64


@dataclass(eq=False)
class _Step:
    buffer: npt.NDArray[np.float32]
    future: asyncio.Future[npt.NDArray[np.int64]]
    enqueued: float


class StepBatcher:
    """Runs encoder steps for a model's streams; ``labels`` is what a stream calls."""

    def __init__(
        self,
        recognizer: Recognizer,
        executor: Executor,
        on_batch: Callable[[int, float, float], None] | None = None,  # (steps, compute_s, max_wait_s)
    ):
        self.recognizer, self.executor, self.on_batch = recognizer, executor, on_batch
        self._queue: list[_Step] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self, stream: BufferedCtcStream, buffers: list[npt.NDArray[np.float32]]) -> None:
        """Run a stream's steps and hand it their labels, in order."""
        for labels in await self.labels(buffers):
            stream.accept(labels)

    async def labels(self, buffers: list[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.int64]]:
        """The best label per encoder frame for each buffer [n_mels, T] (one stream's steps, in order)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"live-steps-{self.recognizer.name}")
        loop = asyncio.get_running_loop()
        steps = [_Step(b, loop.create_future(), time.monotonic()) for b in buffers]
        self._queue += steps
        self._wake.set()
        try:
            return list(await asyncio.gather(*(s.future for s in steps)))
        finally:
            for s in steps:  # a stream that went away mid-wait: its queued steps are not run
                if not s.future.done():
                    s.future.cancel()

    def _run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        lengths = np.full(batch.shape[0], batch.shape[2], np.int64)
        out: npt.NDArray[np.int64] = self.recognizer.engine.run(batch, lengths).argmax(axis=-1)
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._queue = [s for s in self._queue if not s.future.done()]
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            shape = self._queue[0].buffer.shape
            batch = [s for s in self._queue if s.buffer.shape == shape][:MAX_STEPS_PER_BATCH]
            taken = set(map(id, batch))
            self._queue = [s for s in self._queue if id(s) not in taken]
            t0 = time.perf_counter()
            try:
                labels = await loop.run_in_executor(self.executor, self._run, np.stack([s.buffer for s in batch]))
            except Exception as e:  # an ORT failure fails these steps' streams, not the loop
                for s in batch:
                    if not s.future.done():
                        s.future.set_exception(e)
                continue
            now = time.monotonic()
            for s, lab in zip(batch, labels, strict=True):
                if not s.future.done():
                    s.future.set_result(lab)
            if self.on_batch:
                self.on_batch(len(batch), time.perf_counter() - t0, max(now - s.enqueued for s in batch))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for s in self._queue:
            if not s.future.done():
                s.future.set_exception(ServiceUnavailable("shutting_down", "the server is shutting down"))
        self._queue.clear()
