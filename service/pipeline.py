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
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from service.audio import AudioInfo, AudioSource, RawFormat
from service.config import Settings
from service.decoders import DecodeRequest, PathDecoder
from service.decoding import FramePath
from service.errors import ClientError
from service.features import FeatureExtractor, NormStats
from service.longform import ChunkPlan, scan, windows
from service.metrics import Metrics
from service.models import Recognizer, Transcript, Utterance
from service.registry import ModelEntry, ModelRegistry
from service.scheduler import Scheduler
from service.segmenter import SegmenterConfig, has_speech, speech_spans

T = TypeVar("T")
Blocks = Callable[[], Iterator[npt.NDArray[np.float32]]]  # a fresh pass over the recording each call
Guard = Callable[[Coroutine[Any, Any, FramePath]], Awaitable[FramePath]]  # wraps each wait for compute
BLOCK_S = 10  # seconds per block when the audio is already in memory


@dataclass(frozen=True)
class Piece:
    """Audio the model recognizes in one run: a whole short recording, or one window of a long one."""

    samples: npt.NDArray[np.float32]
    stats: NormStats | None  # a long recording's normalization (whole-recording statistics)


PieceDriver = Generator[Piece, FramePath, list[Utterance]]


@dataclass(frozen=True)
class AudioPlan:
    """How a recording is cut into pieces: the settings, fitted to one model."""

    mode: Literal["segments", "windows"]
    segments: SegmenterConfig
    windows: ChunkPlan  # windows mode: the whole recording; segments mode: a run without pauses
    speech_gate: bool
    rate: int
    frame_samples: int


def plan_pieces(blocks: Blocks, plan: AudioPlan, features: FeatureExtractor) -> PieceDriver:
    """Yield the pieces of a recording; receive each one's best path; return its utterances.

    Input that fits one piece is one piece, exactly as NeMo hears it (unless the speech gate finds
    no speech in it: then nothing). Longer input is cut at pauses (``service.segmenter``), each
    utterance normalized over itself; speech that runs on without a pause is recognized in short
    overlapping windows merged at the frame level (``service.longform``). In ``windows`` mode,
    long input is one sequence of overlapping windows with whole-recording normalization.
    """
    if plan.mode == "windows":
        first = scan(blocks(), plan.windows, features)
        if first.samples is not None:
            return (yield from _whole(first.samples, plan))
        parts = []
        for w in windows(blocks(), plan.windows):
            parts.append(w.keep((yield Piece(w.samples, first.stats))))
        return [Utterance(0, FramePath.concat(parts))]
    head, rest = _head(blocks(), int(plan.segments.max_segment_s * plan.rate))
    if rest is None:
        return (yield from _whole(head, plan))
    utterances = []
    for span in speech_spans(itertools.chain([head], rest), plan.rate, plan.segments, plan.frame_samples):
        if not span.run:
            path = yield Piece(span.samples, None)
        else:  # no pause for max_segment_s: short windows, each normalized over itself
            parts = []
            for w in windows(iter([span.samples]), plan.windows):
                parts.append(w.keep((yield Piece(w.samples, None))))
            path = FramePath.concat(parts)
        utterances.append(Utterance(span.start // plan.frame_samples, path))
    return utterances


def _whole(samples: npt.NDArray[np.float32], plan: AudioPlan) -> PieceDriver:
    """A short input: one piece, exactly as NeMo hears it; nothing if the gate finds no speech."""
    if plan.speech_gate and not has_speech(samples, plan.rate, plan.segments):
        return []
    path = yield Piece(samples, None)
    return [Utterance(0, path)]


def _head(
    blocks: Iterator[npt.NDArray[np.float32]], limit: int
) -> tuple[npt.NDArray[np.float32], Iterator[npt.NDArray[np.float32]] | None]:
    """The first blocks up to ``limit`` samples, joined; and the rest (None: the recording ended)."""
    kept: list[npt.NDArray[np.float32]] = []
    n = 0
    for b in blocks:
        kept.append(b)
        n += b.shape[0]
        if n > limit:
            return np.concatenate(kept), blocks
    return (np.concatenate(kept) if kept else np.zeros(0, np.float32)), None


def _advance(driver: PieceDriver, path: FramePath | None) -> Piece | list[Utterance]:
    """One step of the driver: the next piece, or its result (StopIteration cannot cross a Future)."""
    try:
        return driver.send(path)  # type: ignore[arg-type]  # the first send must be None
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def array_blocks(samples: npt.NDArray[np.float32], rate: int) -> Blocks:
    step = BLOCK_S * rate
    return lambda: (samples[i : i + step] for i in range(0, samples.shape[0], step))


RUN_CONTEXT_S = 4.0  # a run without pauses: windows of max_segment_s with this context on each side


def audio_plan(settings: Settings, rec: Recognizer) -> AudioPlan:
    """How ``rec`` hears long audio under ``settings``: pieces no longer than ``ASR_SEGMENT_MAX_S``, the
    longest utterance the model was trained on (its package's ``suited_max_s``), or what its graph takes."""
    max_s = min(settings.segment_max_s, rec.suited_max_s, rec.max_audio_s)
    if settings.long_audio == "windows":
        chunk_s, context_s = settings.chunk_s, settings.chunk_context_s
    else:
        context_s = min(RUN_CONTEXT_S, max_s / 5)
        chunk_s = max_s - 2 * context_s
    return AudioPlan(
        mode=settings.long_audio,
        segments=SegmenterConfig(min_silence_s=settings.min_silence_s, max_segment_s=max_s),
        windows=ChunkPlan.create(chunk_s, context_s, rec.sample_rate, rec.frame_samples, rec.max_audio_s),
        speech_gate=settings.speech_gate,
        rate=rec.sample_rate,
        frame_samples=rec.frame_samples,
    )


def transcribe_samples(
    rec: Recognizer, samples: npt.NDArray[np.float32], plan: AudioPlan, decode: DecodeRequest | None = None
) -> tuple[Transcript, int]:
    """The server's path, in process and synchronous (benchmarks, offline tools).

    Returns the transcript and the number of pieces the model ran on (1: short enough to run whole).
    """
    decoder = rec.decoders.resolve(decode or DecodeRequest())
    driver = plan_pieces(array_blocks(samples, rec.sample_rate), plan, rec.features)
    step = _advance(driver, None)
    pieces = 0
    while isinstance(step, Piece):
        step = _advance(driver, rec.paths([step.samples], [step.stats], [decoder])[0])
        pieces += 1
    return rec.decode_utterances(step), pieces


@dataclass(frozen=True)
class Outcome:
    """One transcribed recording, before a surface renders it."""

    transcript: Transcript
    entry: ModelEntry
    info: AudioInfo  # what the upload was (samples handed over directly: RAW FLOAT at the model's rate)
    duration_s: float
    elapsed_s: float
    chunks: int
    decoding: dict[str, Any] | None = None  # how it was decoded (DecoderFactory.describe)


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
        decode: DecodeRequest | None = None,
    ) -> Outcome:
        """Transcribe an uploaded file (any supported format, or raw PCM as ``raw`` declares).

        ``timeout_s`` bounds each piece's wait in the queue (``DeadlineExceeded``); ``guard``
        wraps each wait, e.g. to cancel it when the client goes away; ``decode`` picks the
        decoder (checked against the model before any audio is read). Errors are ``ServiceError``s.
        """
        t0 = time.perf_counter()
        decode = decode or DecodeRequest()
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
            decoder = await self._prep(rec.decoders.resolve, decode)
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
                driver = plan_pieces(source.blocks, audio_plan(self.settings, rec), rec.features)
                transcript, chunks = await self._run(driver, sched, timeout_s, guard, decoder)
            finally:
                source.close()
        finally:
            self.registry.release(entry)
        out = self._done(entry, transcript, source.info, source.decoded_s, t0, chunks)
        return replace(out, decoding=rec.decoders.describe(decode))

    async def transcribe_samples(
        self,
        entry: ModelEntry,
        samples: npt.NDArray[np.float32],
        *,
        timeout_s: float,
        guard: Guard = _unguarded,
        decode: DecodeRequest | None = None,
    ) -> Outcome:
        """Transcribe mono float32 samples already at the model's rate (live audio, a committed buffer)."""
        t0 = time.perf_counter()
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
            decode = decode or DecodeRequest()
            decoder = await self._prep(rec.decoders.resolve, decode)
            if samples.shape[0] < rec.features.min_samples():
                raise ClientError(400, "audio_too_short", "too little audio to transcribe", "audio")
            driver = plan_pieces(array_blocks(samples, rec.sample_rate), audio_plan(self.settings, rec), rec.features)
            transcript, chunks = await self._run(driver, sched, timeout_s, guard, decoder)
        finally:
            self.registry.release(entry)
        duration_s = samples.shape[0] / rec.sample_rate
        info = AudioInfo("RAW", "FLOAT", rec.sample_rate, 1, duration_s)
        return replace(
            self._done(entry, transcript, info, duration_s, t0, chunks), decoding=rec.decoders.describe(decode)
        )

    async def _run(
        self, driver: PieceDriver, sched: Scheduler, timeout_s: float, guard: Guard, decoder: PathDecoder | None = None
    ) -> tuple[Transcript, int]:
        """Drive ``plan_pieces``: plan on the prep pool, each piece a job of its own in the model's queue."""
        step = await self._prep(_advance, driver, None)
        pieces = 0
        while isinstance(step, Piece):
            path = await guard(sched.infer(step.samples, time.monotonic() + timeout_s, step.stats, decoder))
            step = await self._prep(_advance, driver, path)
            pieces += 1
        return await self._prep(sched.recognizer.decode_utterances, step), pieces

    def _done(
        self, entry: ModelEntry, t: Transcript, info: AudioInfo, duration_s: float, t0: float, chunks: int
    ) -> Outcome:
        elapsed = time.perf_counter() - t0
        self.metrics.success(entry.name, elapsed, duration_s)
        return Outcome(t, entry, info, duration_s, elapsed, chunks)
