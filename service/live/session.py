"""A live session: audio in as it arrives, turns found, words out while the speaker talks.

One session is one client's audio (an OpenAI Realtime connection, a Wyoming conversation, the
browser page). It is cut into *turns* (one utterance each, OpenAI's conversation items):

* ``server_vad``: by the same ``Endpointer`` that cuts long uploads at their pauses (WebRTC VAD
  and the noise floor, ``service.segmenter``): a turn starts with speech (padded by
  ``prefix_padding``) and ends after ``silence_duration`` without it. One idea, two uses.
* manual: the client says where turns end (``input_audio_buffer.commit``, Wyoming's
  ``audio-stop``).

Two rules on the stream's own CTC output end a turn as sherpa-onnx's endpoint rules do: a
maximum turn length (``max_turn_s``; bounds what a turn holds, in both modes) and, with server
VAD, a run of blank frames after decoded text (``blank_end_s``: for noise the VAD takes for
speech).

While a turn runs, its audio goes through a buffered CTC stream (``service.live.buffered``);
text that the stream's kept frames make final goes out as *deltas* (append-only), the right
context's guess as a *provisional* text for surfaces that show one. When the turn ends, the
*completed* transcript is, by default (``final="offline"``), the offline recognition of the
turn's speech (padded as the long-audio segments are), the text an upload of it gets: on the
default model's held-out sentences, WER 12.7 % against 14.0-22.4 % for the stream's own text
(bench/streaming.py). ``final="stream"`` ends with the stream's own text.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from service.errors import ServiceUnavailable
from service.live.batcher import StepBatcher
from service.live.buffered import BufferedCtcStream, EncoderStream, Geometry, Preset
from service.live.cache_aware import CacheAwareBatcher, CacheAwareStream
from service.models import Recognizer
from service.package import StreamingGraph
from service.segmenter import FRAME_S, Endpointer, SegmenterConfig

log = logging.getLogger(__name__)

Final = Literal["offline", "stream"]
NO_LIMIT_S = 1e7
EventKind = Literal["speech_started", "speech_stopped", "committed", "delta", "provisional", "completed"]


@dataclass(frozen=True)
class LiveEvent:
    kind: EventKind
    item: str
    text: str = ""
    audio_ms: int = 0  # speech_started / speech_stopped: where, in the session's audio
    seconds: float = 0.0  # completed: the turn's audio length
    previous: str | None = None  # committed: the item before this one


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's ``server_vad`` parameters (``None`` instead of one: the client commits)."""

    silence_s: float = 0.5
    prefix_s: float = 0.3


@dataclass(frozen=True)
class EndpointRules:
    blank_end_s: float = 1.2  # sherpa-onnx's rule 2: trailing blanks after decoded text
    max_turn_s: float = 20.0  # rule 3: longest turn (the default model's longest training utterance)


class StreamGate:
    """At most ``capacity`` live sessions at once, server-wide; past it a clear refusal."""

    def __init__(self, capacity: int):
        self.capacity, self.active, self.refused, self.opened = capacity, 0, 0, 0

    def admit(self) -> None:
        if self.active >= self.capacity:
            self.refused += 1
            raise ServiceUnavailable(
                "too_many_streams",
                f"{self.active} live sessions are open (ASR_STREAM_MAX={self.capacity}); retry later",
                5,
            )
        self.active += 1
        self.opened += 1

    def release(self) -> None:
        self.active -= 1


def new_item_id() -> str:
    return "item_" + secrets.token_hex(10)


Emit = Callable[[LiveEvent], Awaitable[None]]
OfflineText = Callable[[npt.NDArray[np.float32]], Awaitable[str]]


@dataclass(eq=False)
class _Turn:
    item: str
    start: int  # session sample index of its first sample
    stream: EncoderStream
    audio: list[npt.NDArray[np.float32]] = field(default_factory=list)
    samples: int = 0
    sent: str = ""  # text sent as deltas so far
    stopped_at: float = 0.0  # monotonic time the turn's end was decided
    speech_from: int = -1  # server VAD: where its speech starts and ends (session samples)
    speech_to: int = -1


class LiveSession:
    """One client's live audio (16 kHz float32, already resampled by the surface)."""

    def __init__(
        self,
        recognizer: Recognizer,
        batcher: StepBatcher | CacheAwareBatcher,
        emit: Emit,
        offline_text: OfflineText,
        *,
        preset: Preset,
        turns: TurnDetection | None,
        rules: EndpointRules = EndpointRules(),
        final: Final = "offline",
        provisional: bool = False,
        on_final_latency: Callable[[float], None] | None = None,
        cache_aware: StreamingGraph | None = None,
    ):
        self.rec, self.batcher, self.emit, self.offline_text = recognizer, batcher, emit, offline_text
        self.geometry = Geometry.of(preset, recognizer.features, recognizer.subsampling.factor)
        self.cache_aware = cache_aware  # a cache-aware model's graph (its lookahead): streams carry caches
        self.preset, self.rules, self.final, self.provisional = preset, rules, final, provisional
        self.rate = recognizer.sample_rate
        self.on_final_latency = on_final_latency
        self.samples_in = 0  # session audio so far
        self.previous_item: str | None = None
        self._turn: _Turn | None = None
        self._next_item = new_item_id()  # the id a turn about to start gets (speech_started names it)
        self.set_turn_detection(turns)

    # -- configuration ---------------------------------------------------------------------
    def set_turn_detection(self, turns: TurnDetection | None) -> None:
        self.turns = turns
        self._vad: Endpointer | None = None
        if turns is not None:
            cfg = SegmenterConfig(
                min_silence_s=turns.silence_s,
                pad_before_s=turns.prefix_s,
                pad_after_s=0.0,
                max_segment_s=NO_LIMIT_S,  # turns are bounded by EndpointRules.max_turn_s instead
                max_run_s=NO_LIMIT_S,
            )
            self._vad = Endpointer(self.rate, cfg, keep_audio=False)
            self._vad.judged = self._vad._buf_start = self.samples_in

    # -- audio in --------------------------------------------------------------------------
    async def append(self, x: npt.NDArray[np.float32]) -> None:
        if self._vad is None:
            if self._turn is None and x.shape[0]:
                self._open(self.samples_in)
            self.samples_in += x.shape[0]
            await self._feed(x)
            return
        step = round(FRAME_S * self.rate)
        for i in range(0, x.shape[0], step):
            piece = x[i : i + step]
            was = self._vad.in_speech
            ended = self._vad.push(piece)
            self.samples_in += piece.shape[0]
            if self._turn is not None:
                await self._feed(piece)
                if ended and self._turn is not None:
                    self._turn.speech_to = ended[0].end
                if ended or not self._vad.in_speech:
                    await self.emit(LiveEvent("speech_stopped", self._turn.item, audio_ms=self._ms(self.samples_in)))
                    await self.end_turn()
            if self._vad.in_speech and (not was or ended or self._turn is None):
                start = self._vad.turn_start
                self._open(start)
                assert self._turn is not None
                self._turn.speech_from = self._vad.speech_start
                await self.emit(LiveEvent("speech_started", self._turn.item, audio_ms=self._ms(start)))
                await self._feed(self._vad.audio_from(start))

    async def commit(self) -> str | None:
        """End the turn in progress now (the client's commit); its item id, None if there was none."""
        if self._turn is None:
            return None
        item = self._turn.item
        if self._vad is not None and self._vad.in_speech:
            self.set_turn_detection(self.turns)  # the VAD starts afresh after a manual commit
        await self.end_turn()
        return item

    def clear(self) -> None:
        """Drop the audio of the turn in progress (``input_audio_buffer.clear``)."""
        self._turn = None
        if self.turns is not None:
            self.set_turn_detection(self.turns)

    @property
    def pending_samples(self) -> int:
        return self._turn.samples if self._turn else 0

    # -- turns -----------------------------------------------------------------------------
    def new_stream(self) -> EncoderStream:
        """The recognition state of one turn (the seam for models that stream differently)."""
        if self.cache_aware is not None:
            return CacheAwareStream(self.rec.features, self.cache_aware, self.rec.blank_id)
        return BufferedCtcStream(self.rec.features, self.geometry, self.rec.blank_id)

    def _open(self, start: int) -> None:
        stream = self.new_stream()
        self._turn = _Turn(self._next_item, start, stream)
        self._next_item = new_item_id()

    async def _feed(self, x: npt.NDArray[np.float32]) -> None:
        t = self._turn
        if t is None or x.shape[0] == 0:
            return
        t.audio.append(x.copy())
        t.samples += x.shape[0]
        bufs = t.stream.push(x)
        if bufs:
            await self._steps(t, bufs)
        if self._turn is t and self._rule_ends(t):
            if self._vad is not None:
                await self.emit(LiveEvent("speech_stopped", t.item, audio_ms=self._ms(self.samples_in)))
                self._vad = None
                self.set_turn_detection(self.turns)  # the VAD's own turn ends with this one
            await self.end_turn()

    def _rule_ends(self, t: _Turn) -> bool:
        if t.samples >= self.rules.max_turn_s * self.rate:
            return True
        if self._vad is None:  # the client ends turns: only the length limit applies
            return False
        blank_s = t.stream.trailing_blanks * self.rec.frame_shift_s
        return bool(t.stream.ids) and blank_s >= self.rules.blank_end_s

    async def _steps(self, t: _Turn, bufs: list[Any]) -> None:
        await self.batcher.run(t.stream, bufs)  # type: ignore[arg-type]  # each batcher takes its own streams
        text = self.rec.detokenize(t.stream.ids)
        if text.startswith(t.sent) and len(text) > len(t.sent):
            delta, t.sent = text[len(t.sent) :], text
            await self.emit(LiveEvent("delta", t.item, delta))
        if self.provisional:
            await self.emit(
                LiveEvent("provisional", t.item, self.rec.detokenize(t.stream.ids + t.stream.provisional_ids()))
            )

    async def end_turn(self) -> None:
        """Finish the turn in progress: committed, then its last deltas and completed."""
        t, self._turn = self._turn, None
        if t is None:
            return
        t.stopped_at = time.monotonic()
        await self.emit(LiveEvent("committed", t.item, previous=self.previous_item))
        self.previous_item = t.item
        audio = np.concatenate(t.audio) if t.audio else np.zeros(0, np.float32)
        t.audio = []
        if self.final == "stream" or audio.shape[0] < self.rec.features.min_samples():
            await self._steps(t, t.stream.finish())
            text = self.rec.detokenize(t.stream.ids).strip()
        else:
            text = (await self.offline_text(self._speech_of(t, audio))).strip()
            if text.startswith(t.sent) and len(text) > len(t.sent):  # deltas add up to the final text
                delta, t.sent = text[len(t.sent) :], text
                await self.emit(LiveEvent("delta", t.item, delta))
        if self.on_final_latency:
            self.on_final_latency(time.monotonic() - t.stopped_at)
        await self.emit(LiveEvent("completed", t.item, text, seconds=audio.shape[0] / self.rate))

    def _speech_of(self, t: _Turn, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """What the offline pass hears of a turn the VAD ended: its speech with the padding long
        uploads get (``SegmenterConfig``: 0.1 s before, 0.3 s after; measured best there), not the
        client's ``prefix_padding`` and the whole ``silence_duration`` after. Measured on the
        default model, 24 held-out sentences, preset fast: WER 14.5 % with the whole turn."""
        if t.speech_from < 0 or t.speech_to < 0:
            return audio  # the client ended the turn: all of its audio, as committed
        pads = SegmenterConfig()
        a = max(0, t.speech_from - int(pads.pad_before_s * self.rate) - t.start)
        b = min(audio.shape[0], t.speech_to + int(pads.pad_after_s * self.rate) - t.start)
        return audio[a:b] if b - a >= self.rec.features.min_samples() else audio

    async def close(self) -> None:
        self._turn = None

    def _ms(self, sample: int) -> int:
        return int(sample * 1000 // self.rate)
