"""The one path from audio to a transcript, for every surface and tool.

bytes (an upload) or samples -> ``AudioSource`` (detect, decode, resample, validate, block by
block) -> ``plan_pieces`` (one piece, or the overlapping windows of a long recording, see
``service.longform``) -> the model's ``Scheduler`` (queue, batches, deadlines) -> greedy CTC
over the kept frames -> ``Transcript`` with timed words.

The long-audio driver is written once, as a generator (``plan_pieces``) that yields the pieces
to recognize and is sent back their best paths. ``Pipeline`` drives it asynchronously for the
server (decoding on a small "prep" pool, inference through the scheduler, so the event loop
never computes); ``transcribe_samples`` drives it in process for benchmarks and offline tools.
Both therefore cut, normalize and merge a recording identically.

The pipeline knows nothing of HTTP: a surface hands it an entry of the registry, the audio, a
timeout and a ``guard`` (e.g. "cancel if the client disconnects") and renders the ``Outcome``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np
import numpy.typing as npt

from service.audio import AudioInfo, AudioSource, RawFormat
from service.config import Settings
from service.decoding import FramePath
from service.errors import ClientError
from service.features import FeatureExtractor, NormStats
from service.longform import ChunkPlan, scan, windows
from service.metrics import Metrics
from service.models import Recognizer, Transcript
from service.registry import ModelEntry, ModelRegistry
from service.scheduler import Scheduler

T = TypeVar("T")
Blocks = Callable[[], Iterator[npt.NDArray[np.float32]]]  # a fresh pass over the recording each call
Guard = Callable[[Coroutine[Any, Any, FramePath]], Awaitable[FramePath]]  # wraps each wait for compute
BLOCK_S = 10  # seconds per block when the audio is already in memory


@dataclass(frozen=True)
class Piece:
    """Audio the model recognizes in one run: a whole short recording, or one window of a long one."""

    samples: npt.NDArray[np.float32]
    stats: NormStats | None  # a long recording's normalization (whole-recording statistics)


PieceDriver = Generator[Piece, FramePath, tuple[FramePath, int]]


def plan_pieces(blocks: Blocks, plan: ChunkPlan, features: FeatureExtractor) -> PieceDriver:
    """Yield the pieces of a recording; receive each one's best path; return the merged path and the count.

    A recording that fits one window is one piece. A longer one is read twice: a first pass for
    its normalization statistics (``scan``), then window by window, keeping each window's core
    frames, so the merged path is one continuous frame sequence (``service.longform``).
    """
    first = scan(blocks(), plan, features)
    if first.samples is not None:
        path = yield Piece(first.samples, None)
        return path, 1
    parts = []
    for w in windows(blocks(), plan):
        out = yield Piece(w.samples, first.stats)
        parts.append(w.keep(out))
    return FramePath.concat(parts), len(parts)


def _advance(driver: PieceDriver, path: FramePath | None) -> Piece | tuple[FramePath, int]:
    """One step of the driver: the next piece, or its result (StopIteration cannot cross a Future)."""
    try:
        return driver.send(path)  # type: ignore[arg-type]  # the first send must be None
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def array_blocks(samples: npt.NDArray[np.float32], rate: int) -> Blocks:
    step = BLOCK_S * rate
    return lambda: (samples[i : i + step] for i in range(0, samples.shape[0], step))


def chunk_plan(settings: Settings, rec: Recognizer) -> ChunkPlan:
    """The window plan for ``rec``: ``ASR_CHUNK_S`` cores with ``ASR_CHUNK_CONTEXT_S`` on each side."""
    return ChunkPlan.create(
        settings.chunk_s, settings.chunk_context_s, rec.sample_rate, rec.frame_samples, rec.max_audio_s
    )


def transcribe_samples(rec: Recognizer, samples: npt.NDArray[np.float32], plan: ChunkPlan) -> tuple[Transcript, int]:
    """The server's path, in process and synchronous (benchmarks, offline tools).

    Returns the transcript and the number of pieces (1: short enough to run unchunked).
    """
    driver = plan_pieces(array_blocks(samples, rec.sample_rate), plan, rec.features)
    step = _advance(driver, None)
    while isinstance(step, Piece):
        step = _advance(driver, rec.paths([step.samples], [step.stats])[0])
    path, pieces = step
    return rec.decode(path), pieces


@dataclass(frozen=True)
class Outcome:
    """One transcribed recording, before a surface renders it."""

    transcript: Transcript
    entry: ModelEntry
    info: AudioInfo  # what the upload was (samples handed over directly: RAW FLOAT at the model's rate)
    duration_s: float
    elapsed_s: float
    chunks: int


async def _unguarded(work: Coroutine[Any, Any, FramePath]) -> FramePath:
    return await work


class Pipeline:
    """Audio -> transcript through a model's scheduler, off the event loop. One per app."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics):
        self.settings, self.registry, self.metrics = settings, registry, metrics
        # Decoding and resampling uploads (and planning windows), kept off the event loop.
        self.prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="asr-prep")

    def close(self) -> None:
        self.prep_pool.shutdown(wait=True, cancel_futures=True)

    async def _prep(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, lambda: fn(*args, **kw))

    async def transcribe(
        self,
        entry: ModelEntry,
        file: BinaryIO,
        raw: RawFormat | None = None,
        *,
        timeout_s: float,
        guard: Guard = _unguarded,
    ) -> Outcome:
        """Transcribe an uploaded file (any supported format, or raw PCM as ``raw`` declares).

        ``timeout_s`` bounds each piece's wait in the queue (``DeadlineExceeded``); ``guard``
        wraps each wait, e.g. to cancel it when the client goes away. Errors are ``ServiceError``s.
        """
        t0 = time.perf_counter()
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
            # Never below what the features need (two frames for normalization).
            min_s = max(self.settings.min_duration_s, rec.features.min_samples() / rec.sample_rate)
            source = await self._prep(
                AudioSource,
                file,
                rec.sample_rate,
                max_duration_s=self.settings.max_duration_s,
                min_duration_s=min_s,
                raw=raw,
            )
            try:
                driver = plan_pieces(source.blocks, chunk_plan(self.settings, rec), rec.features)
                transcript, chunks = await self._run(driver, sched, timeout_s, guard)
            finally:
                source.close()
        finally:
            self.registry.release(entry)
        return self._done(entry, transcript, source.info, source.decoded_s, t0, chunks)

    async def transcribe_samples(
        self, entry: ModelEntry, samples: npt.NDArray[np.float32], *, timeout_s: float, guard: Guard = _unguarded
    ) -> Outcome:
        """Transcribe mono float32 samples already at the model's rate (live audio, a committed buffer)."""
        t0 = time.perf_counter()
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
            if samples.shape[0] < rec.features.min_samples():
                raise ClientError(400, "audio_too_short", "too little audio to transcribe", "audio")
            driver = plan_pieces(array_blocks(samples, rec.sample_rate), chunk_plan(self.settings, rec), rec.features)
            transcript, chunks = await self._run(driver, sched, timeout_s, guard)
        finally:
            self.registry.release(entry)
        duration_s = samples.shape[0] / rec.sample_rate
        info = AudioInfo("RAW", "FLOAT", rec.sample_rate, 1, duration_s)
        return self._done(entry, transcript, info, duration_s, t0, chunks)

    async def _run(
        self, driver: PieceDriver, sched: Scheduler, timeout_s: float, guard: Guard
    ) -> tuple[Transcript, int]:
        """Drive ``plan_pieces``: plan on the prep pool, each piece a job of its own in the model's queue."""
        step = await self._prep(_advance, driver, None)
        while isinstance(step, Piece):
            path = await guard(sched.infer(step.samples, time.monotonic() + timeout_s, step.stats))
            step = await self._prep(_advance, driver, path)
        path, chunks = step
        return await self._prep(sched.recognizer.decode, path), chunks

    def _done(
        self, entry: ModelEntry, t: Transcript, info: AudioInfo, duration_s: float, t0: float, chunks: int
    ) -> Outcome:
        elapsed = time.perf_counter() - t0
        self.metrics.success(entry.name, elapsed, duration_s)
        return Outcome(t, entry, info, duration_s, elapsed, chunks)
