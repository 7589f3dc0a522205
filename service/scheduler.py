"""Micro-batching scheduler: one per served model, in front of its recognizer.

Requests are admitted first (``service.registry.AdmissionGate``: a bounded count server-wide),
so a burst past capacity is refused at once with 503 + ``Retry-After`` instead of piling up
memory. Admitted audio waits in its model's queue; a worker takes the oldest job, waits at most
``max_queue_delay_ms`` (counted from that job's arrival) for company, adds the queued jobs
closest to it in length (so padding stays small) up to ``max_batch_size``, drops jobs whose
deadline passed or whose client went away, runs one padded batch in the inference executor
and hands each caller its own best path.

Concurrency: ``workers`` batches run at once (default 1), each with ONNX Runtime's intra-op
threads; on a CPU host more concurrent runs than cores only adds contention
(``bench/load.py`` measures it). On CPU the service defaults to ``max_batch_size`` 1 (measured:
padded batches lowered throughput there); the queue, admission and deadlines work the same.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.decoders import PathDecoder
from service.decoding import FramePath
from service.engine import release_memory
from service.errors import DeadlineExceeded, ServiceUnavailable
from service.features import NormStats
from service.models import Recognizer

# Padding allowed when grouping by length: the batch's padded frames may exceed its real
# frames by at most this fraction (beyond it, the extra job waits for a batch of its own).
MAX_PADDING = 0.25
# Audio per batch (seconds, padded): bounds the memory of one batch; a longer single job runs alone.
MAX_BATCH_AUDIO_S = 240.0
# Heap memory goes back to the OS once the queue has been empty this long (not after every
# request: back-to-back requests would pay the page faults of re-growing it, measured 15-20 %).
IDLE_TRIM_S = 1.0


@dataclass(eq=False)
class Job:
    samples: npt.NDArray[np.float32]
    stats: NormStats | None  # a long recording's normalization, for one of its windows
    future: asyncio.Future[FramePath]
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic(); math.inf = none
    started: float = 0.0  # when its batch began, 0 while queued
    decoder: PathDecoder | None = None  # beam search (service.decoders); None: greedy

    @property
    def n(self) -> int:
        return int(self.samples.shape[0])


@dataclass
class BatchStats:
    """What one batch did, for the metrics: sizes, waits and compute time."""

    size: int
    audio_s: float
    compute_s: float
    queue_s: list[float] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        recognizer: Recognizer,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        workers: int = 1,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self.recognizer = recognizer
        self.executor = executor
        self.max_batch_size = max(1, max_batch_size)
        self.max_delay_s = max(0.0, max_queue_delay_ms) / 1000.0
        self.workers = max(1, workers)
        self.on_batch = on_batch
        self.max_queued = 0
        self._queue: list[Job] = []
        self._changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._rtf_estimate = 0.05  # compute seconds per audio second, updated from real batches

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(), name=f"asr-batch-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailable("shutting_down", "the server is shutting down"))
        self._queue.clear()

    # -- submission -----------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        """A client's best wait before retrying: queued audio x measured compute speed."""
        queued_s = sum(j.n for j in self._queue) / self.recognizer.sample_rate
        return max(1, math.ceil(queued_s * self._rtf_estimate / self.workers))

    async def infer(
        self,
        samples: npt.NDArray[np.float32],
        deadline: float = math.inf,
        stats: NormStats | None = None,
        decoder: PathDecoder | None = None,
    ) -> FramePath:
        """Queue ``samples`` and wait for its best path (``Recognizer.decode`` makes it a transcript).

        Raises ``DeadlineExceeded`` when the deadline passes before the job's batch starts.
        Cancelling the awaiting task (client gone) removes a queued job; a job whose batch
        already started finishes and its result is dropped.
        """
        assert self._changed is not None, "scheduler not started"
        loop = asyncio.get_running_loop()
        job = Job(samples, stats, loop.create_future(), time.monotonic(), deadline, decoder=decoder)
        self._queue.append(job)
        self.max_queued = max(self.max_queued, len(self._queue))
        self._changed.set()
        try:
            timeout = None if math.isinf(deadline) else max(0.0, deadline - job.enqueued)
            try:
                return await asyncio.wait_for(asyncio.shield(job.future), timeout)
            except TimeoutError:
                if job.started:  # its batch is running: the result is moments away
                    return await job.future
                raise DeadlineExceeded(time.monotonic() - job.enqueued) from None
        finally:
            if not job.started and job in self._queue:
                self._queue.remove(job)  # cancelled or timed out while queued: never computed

    # -- the worker -------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        """The oldest job plus the queued jobs nearest to it in length, within the padding budget."""
        anchor = self._queue[0]
        rest = sorted(self._queue[1:], key=lambda j: abs(math.log(max(j.n, 1) / max(anchor.n, 1))))
        batch = [anchor]
        longest, total = anchor.n, anchor.n
        rate = self.recognizer.sample_rate
        for job in rest:
            if len(batch) >= self.max_batch_size:
                break
            new_longest = max(longest, job.n)
            padded = new_longest * (len(batch) + 1)
            if padded > (1 + MAX_PADDING) * (total + job.n) or padded > MAX_BATCH_AUDIO_S * rate:
                continue
            batch.append(job)
            longest, total = new_longest, total + job.n
        for job in batch:
            self._queue.remove(job)
        return batch

    def _release(self) -> None:
        """Idle: the arena's spare chunks (when ASR_CPU_MEM_ARENA is on), then the heap's, to the OS."""
        self.recognizer.engine.shrink(self.recognizer.features.n_mels)
        release_memory()

    async def _worker(self) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:  # idle for IDLE_TRIM_S: give back what the last batches freed
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), IDLE_TRIM_S)
                except TimeoutError:
                    await loop.run_in_executor(self.executor, self._release)
            while not self._queue:
                self._changed.clear()
                await self._changed.wait()
            # Wait for company, at most max_delay after the oldest job arrived.
            wait_until = self._queue[0].enqueued + self.max_delay_s
            while self._queue and len(self._queue) < self.max_batch_size and (now := time.monotonic()) < wait_until:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait_until - now)
                except TimeoutError:
                    break
            if not self._queue:
                continue
            batch = self._take_batch()
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # cancelled by its caller
                    continue
                if now > job.deadline:
                    job.future.set_exception(DeadlineExceeded(now - job.enqueued))
                    continue
                job.started = now
                live.append(job)
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self.executor,
                    self.recognizer.paths,
                    [j.samples for j in live],
                    [j.stats for j in live],
                    [j.decoder for j in live],
                )
            except Exception as e:  # an ORT failure fails this batch's callers, not the worker
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            compute_s = time.perf_counter() - t0
            audio_s = sum(j.n for j in live) / self.recognizer.sample_rate
            if audio_s > 0:
                self._rtf_estimate = 0.8 * self._rtf_estimate + 0.2 * compute_s / audio_s
            for job, res in zip(live, results, strict=True):
                if not job.future.done():
                    job.future.set_result(res)
            if self.on_batch:
                self.on_batch(BatchStats(len(live), audio_s, compute_s, [j.started - j.enqueued for j in live]))
