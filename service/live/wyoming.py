"""Home Assistant's Wyoming protocol over TCP (``ASR_WYOMING_PORT``; 10300 is the usual port).

Home Assistant's voice pipeline (and any ``wyoming`` client) sends ``describe`` (answered with
``info``: this program, its models and languages, ``supports_transcript_streaming``),
``transcribe`` (model name and language, optional), then ``audio-start`` / ``audio-chunk``s /
``audio-stop``. While audio arrives the server streams ``transcript-start`` and
``transcript-chunk``s (the words as they become final); at ``audio-stop`` it sends the whole
``transcript`` and ``transcript-stop``. Home Assistant finds the end of speech itself, so a
conversation is one turn (a turn longer than the model's limit is split, and its parts joined).

Events are read here with limits (header line, data and payload sizes), not with the package's
``async_read_event``, which would read any length a client announces. Bad input gets a
Wyoming ``error`` event naming the problem, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import numpy as np
import numpy.typing as npt
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info

from service import __version__
from service.errors import ServiceError
from service.live.audio_in import AudioFormatError, LiveAudio
from service.live.hub import LiveHub
from service.live.session import LiveEvent, LiveSession
from service.quotas import address_key

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024  # one JSON line
ATTRIBUTION = Attribution(name="NVIDIA NeMo", url="https://github.com/NVIDIA/NeMo")


class BadEvent(Exception):
    """A client event this server refuses: sent back as a Wyoming ``error``, then the connection closes."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """One event, or None at the end of the stream; ``BadEvent`` for what is not a sane event."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise BadEvent("invalid_event", "the connection ended inside an event header") from None
    except asyncio.LimitOverrunError:
        raise BadEvent("event_too_large", f"an event header longer than {MAX_HEADER} bytes") from None
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadEvent("invalid_json", "an event header is not a JSON object on one line") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadEvent("invalid_event", "an event header is a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadEvent("invalid_event", "an event's 'data' must be a JSON object")
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not all(isinstance(n, int) and 0 <= n <= max_bytes for n in lengths):
        raise BadEvent("event_too_large", f"data_length and payload_length must be 0-{max_bytes} bytes")
    try:
        if lengths[0]:
            extra = json.loads(await reader.readexactly(lengths[0]))
            if not isinstance(extra, dict):
                raise BadEvent("invalid_event", "an event's data block must be a JSON object")
            data.update(extra)
        payload = await reader.readexactly(lengths[1]) if lengths[1] else None
    except asyncio.IncompleteReadError:
        raise BadEvent("invalid_event", "the connection ended inside an event") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadEvent("invalid_json", "an event's data block is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload)


def info(hub: LiveHub) -> Info:
    models = [
        AsrModel(
            name=name,
            attribution=ATTRIBUTION,
            installed=True,
            description=f"NeMo CTC model {name}",
            version=__version__,
            languages=[e.language] if e.language else [],
        )
        for name, e in hub.registry.entries.items()
    ]
    program = AsrProgram(
        name="nemo-ctc-asr",
        attribution=ATTRIBUTION,
        installed=True,
        description="CPU-first speech recognition for NVIDIA NeMo CTC models",
        version=__version__,
        models=models,
        supports_transcript_streaming=True,
    )
    return Info(asr=[program])


class Conversation:
    """One client connection: any number of transcriptions, one after another."""

    def __init__(self, hub: LiveHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hub, self.reader, self.writer = hub, reader, writer
        peer = writer.get_extra_info("peername")
        self.client = address_key(peer[0] if peer else None)  # Wyoming has no API keys: quotas by address
        self.settings = hub.settings
        self.model: str | None = None
        self.language: str | None = None
        self.texts: list[str] = []

    async def write(self, event: Event) -> None:
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), self.settings.stream_idle_timeout_s)
        except TimeoutError:
            raise ConnectionResetError("the client is not reading") from None

    async def serve(self) -> None:
        max_bytes = int(self.settings.stream_max_message_mb * 2**20)
        try:
            while True:
                ev = await asyncio.wait_for(read_event(self.reader, max_bytes), self.settings.stream_idle_timeout_s)
                if ev is None:
                    return
                if Describe.is_type(ev.type):
                    await self.write(info(self.hub).event())
                elif Transcribe.is_type(ev.type):
                    t = Transcribe.from_event(ev)
                    self.model, self.language = t.name, t.language
                elif AudioStart.is_type(ev.type):
                    await self.transcribe(AudioStart.from_event(ev), max_bytes)
                elif AudioChunk.is_type(ev.type) or AudioStop.is_type(ev.type):
                    raise BadEvent("no_audio_start", f"{ev.type} before audio-start")
                # Other events (ping, a satellite's run-pipeline...) are not for an ASR server: ignored.
        except BadEvent as e:
            with contextlib.suppress(Exception):
                await self.write(Error(text=e.text, code=e.code).event())
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.write(
                    Error(text="no event for too long (ASR_STREAM_IDLE_TIMEOUT_S)", code="idle_timeout").event()
                )

    async def transcribe(self, start: AudioStart, max_bytes: int) -> None:
        if start.width != 2 or start.channels not in (1, 2):
            raise BadEvent(
                "unsupported_audio",
                f"audio must be 16-bit PCM, mono or stereo (got width {start.width}, {start.channels} channels)",
            )
        channels = start.channels
        try:
            entry = self.hub.registry.resolve(self.model, self.language)
            self.hub.admit("wyoming", self.client)
        except ServiceError as e:
            raise BadEvent(e.code, e.message) from None
        self.texts = []

        async def emit(ev: LiveEvent) -> None:
            if ev.kind == "delta":
                await self.write(TranscriptChunk(text=ev.text).event())
            elif ev.kind == "completed" and ev.text:
                self.texts.append(ev.text)

        try:
            async with self.hub.session(entry, emit, turns=None) as live:
                try:
                    audio = LiveAudio("pcm16", start.rate, live.rate)
                except AudioFormatError as e:
                    raise BadEvent("unsupported_audio", str(e)) from None
                await self.write(TranscriptStart(language=self.language or entry.language).event())
                await self.stream(live, audio, channels, max_bytes)
                text = " ".join(self.texts)
                await self.write(Transcript(text=text, language=self.language or entry.language).event())
                await self.write(TranscriptStop().event())
            self.hub.metrics.stream("wyoming", "ok")
        except ServiceError as e:
            raise BadEvent(e.code, e.message) from None
        finally:
            self.hub.release(self.client)

    async def stream(self, live: LiveSession, audio: LiveAudio, channels: int, max_bytes: int) -> None:
        max_samples = int(self.settings.stream_max_session_s * live.rate)
        idle_s = self.settings.stream_idle_timeout_s
        while True:
            ev = await self.hub.unless_finishing(read_event(self.reader, max_bytes), idle_s)
            if ev is None and self.hub.finishing.is_set():  # a draining server's time is up (service.drain):
                await live.commit()  # the transcript of what was heard goes out, as after an audio-stop
                return
            if ev is None:
                raise ConnectionResetError("the client went away mid-transcription")
            if AudioStop.is_type(ev.type):
                await live.commit()
                return
            if not AudioChunk.is_type(ev.type):
                continue  # e.g. a transcribe or ping in the middle: nothing to do
            try:
                x = audio.decode(ev.payload or b"") if channels == 1 else _downmix(audio, ev.payload or b"")
            except AudioFormatError as e:
                raise BadEvent("invalid_audio", str(e)) from None
            await live.append(x)
            try:
                self.hub.quotas.charge(self.client, x.shape[0] / live.rate)
            except ServiceError as e:  # the client's audio quota ran dry
                raise BadEvent(e.code, e.message) from None
            if live.samples_in > max_samples:
                raise BadEvent(
                    "session_expired", "the audio reached the maximum session length (ASR_STREAM_MAX_SESSION_S)"
                )


def _downmix(audio: LiveAudio, data: bytes) -> npt.NDArray[np.float32]:
    """Stereo PCM16 -> the mean of both channels, through the session's decoder."""
    if len(data) % 4:
        raise AudioFormatError("stereo 16-bit audio must come in 4-byte frames")
    x = np.frombuffer(data, "<i2").reshape(-1, 2).mean(axis=1).astype("<i2")
    return audio.decode(x.tobytes())


class WyomingServer:
    """The TCP listener; each connection is a ``Conversation``."""

    def __init__(self, hub: LiveHub, host: str, port: int):
        self.hub, self.host, self.port = hub, host, port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEADER)
        log.info("Wyoming server listening on %s:%d", self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await Conversation(self.hub, reader, writer).serve()
        except ConnectionError:
            pass
        except asyncio.CancelledError:  # server shutdown
            with contextlib.suppress(Exception):
                stop = Error(text="the server is shutting down", code="shutting_down").event()
                await asyncio.wait_for(async_write_event(stop, writer), 1.0)
        except Exception:
            log.exception("Wyoming connection failed")
            with contextlib.suppress(Exception):
                await async_write_event(
                    Error(text="internal error; the server log has the details", code="server_error").event(), writer
                )
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def stop_listening(self) -> None:
        """No new connections (the drain); open ones go on until ``stop``."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        self.stop_listening()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
