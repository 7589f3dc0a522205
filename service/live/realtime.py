"""The OpenAI Realtime API's transcription sessions, over WebSocket: ``/v1/realtime``.

What OpenAI clients send and expect (the official ``openai`` SDK's ``client.realtime.connect``
works unchanged but for ``base_url``):

* client events: ``session.update`` (``session.type: "transcription"``, the current API),
  ``transcription_session.update`` (the beta API), ``input_audio_buffer.append`` (base64 audio),
  ``.commit`` and ``.clear``;
* server events: ``session.created`` / ``.updated`` (or ``transcription_session.updated``),
  ``input_audio_buffer.speech_started`` / ``speech_stopped`` / ``committed`` / ``cleared``,
  ``conversation.item.added``, ``conversation.item.input_audio_transcription.delta`` (append-only
  text while the speaker talks) and ``.completed`` per turn, and ``error`` (the session stays open
  on an error a client can correct; limits close it).

Audio: ``audio/pcm`` (PCM16 little-endian; 24 kHz as OpenAI sends it, or any rate from 8 to
48 kHz, e.g. 16 kHz), ``audio/pcmu`` and ``audio/pcma`` (G.711, 8 kHz). The transcription
model names a served package; OpenAI's own names and ``default`` mean the default model.

Extension: with ``?provisional=true`` the server also sends
``conversation.item.input_audio_transcription.provisional`` events (the turn's text so far,
final part plus the right context's guess, replaced by the next one); the /live page uses them.

Close codes: 1008 (idle too long, session too long, a client that does not read), 1009 (message
too large), 1013 (too many sessions: try again later), 1011 (internal error); 1012 ("service
restart": reconnect) when a draining server ends a session, after the turn in progress has been
finished and its final transcript sent (``service.drain``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
import secrets
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from service.errors import ClientError, ServiceError
from service.live.audio_in import AudioFormatError, Encoding, LiveAudio
from service.live.buffered import PRESETS
from service.live.hub import LiveHub
from service.live.session import LiveEvent, LiveSession, TurnDetection
from service.quotas import client_key
from service.routes.openai import served_model

log = logging.getLogger(__name__)
router = APIRouter()

OUTBOX = 512  # events queued for a client; a client this far behind is not reading: closed
MIN_COMMIT_MS = 100  # OpenAI's minimum for a manual commit
ITEM = "conversation.item.input_audio_transcription"
BETA_FORMATS = {"pcm16": "pcm16", "g711_ulaw": "ulaw", "g711_alaw": "alaw"}  # beta input_audio_format


class Refused(Exception):
    """End the connection: an error event, then a close code."""

    def __init__(self, code: str, message: str, close: int):
        super().__init__(message)
        self.code, self.message, self.close = code, message, close


def event_id() -> str:
    return "event_" + secrets.token_hex(10)


def error_event(code: str, message: str, param: str | None = None, client_event: str | None = None) -> dict[str, Any]:
    etype = "invalid_request_error" if code not in ("server_error", "too_many_streams") else "server_error"
    return {
        "type": "error",
        "event_id": event_id(),
        "error": {"type": etype, "code": code, "message": message, "param": param, "event_id": client_event},
    }


class Config:
    """The session's settings, in both API generations' shapes."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.language: str | None = None
        self.prompt = ""
        self.encoding: Encoding = "pcm16"
        self.rate = 24000
        self.turns: TurnDetection | None = TurnDetection()
        self.threshold = 0.5
        self.include: list[str] = []
        self.beta = False

    def fmt(self) -> dict[str, Any]:
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": "audio/pcmu" if self.encoding == "ulaw" else "audio/pcma"}

    def turn_detection(self) -> dict[str, Any] | None:
        if self.turns is None:
            return None
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": round(self.turns.prefix_s * 1000),
            "silence_duration_ms": round(self.turns.silence_s * 1000),
        }

    def session(self, sid: str) -> dict[str, Any]:
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if self.beta:
            beta_fmt = {"pcm16": "pcm16", "ulaw": "g711_ulaw", "alaw": "g711_alaw"}[self.encoding]
            return {
                "id": sid,
                "object": "realtime.transcription_session",
                "input_audio_format": beta_fmt,
                "input_audio_transcription": transcription,
                "turn_detection": self.turn_detection(),
                "input_audio_noise_reduction": None,
                "include": self.include,
            }
        return {
            "type": "transcription",
            "id": sid,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": self.fmt(),
                    "transcription": transcription,
                    "turn_detection": self.turn_detection(),
                    "noise_reduction": None,
                }
            },
            "include": self.include,
        }

    def update(self, s: dict[str, Any], beta: bool) -> None:
        """Apply a session object; ClientError names the first field it cannot take."""
        self.beta = beta
        if beta:
            fmt = s.get("input_audio_format")
            if fmt is not None:
                enc = (
                    {"pcm16": "pcm16", "g711_ulaw": "ulaw", "g711_alaw": "alaw"}.get(fmt)
                    if isinstance(fmt, str)
                    else None
                )
                if enc is None:
                    raise ClientError(
                        400,
                        "invalid_value",
                        f"input_audio_format {fmt!r}: use pcm16, g711_ulaw or g711_alaw",
                        "session.input_audio_format",
                    )
                self.encoding, self.rate = enc, 24000 if enc == "pcm16" else 8000  # type: ignore[assignment]
            self._transcription(s.get("input_audio_transcription"), "session.input_audio_transcription")
            if "turn_detection" in s:
                self._turns(s["turn_detection"], "session.turn_detection")
        else:
            if s.get("type", "transcription") != "transcription":
                raise ClientError(
                    400,
                    "invalid_value",
                    "this server serves transcription sessions only (session.type: 'transcription')",
                    "session.type",
                )
            audio = _object(s.get("audio"), "session.audio")
            audio_in = _object(audio.get("input"), "session.audio.input")
            fmt = audio_in.get("format")
            if fmt is not None:
                self._format(fmt)
            self._transcription(audio_in.get("transcription"), "session.audio.input.transcription")
            if "turn_detection" in audio_in:
                self._turns(audio_in["turn_detection"], "session.audio.input.turn_detection")
        if "include" in s:
            inc = s.get("include") or []
            if not isinstance(inc, list) or not all(isinstance(i, str) for i in inc):
                raise ClientError(400, "invalid_type", "include must be a list of strings", "session.include")
            self.include = inc

    def _format(self, fmt: Any) -> None:
        if not isinstance(fmt, dict):
            raise ClientError(
                400,
                "invalid_type",
                "format must be an object like {'type': 'audio/pcm', 'rate': 24000}",
                "session.audio.input.format",
            )
        t = fmt.get("type", "audio/pcm")
        if t == "audio/pcm":
            rate = fmt.get("rate", 24000)
            if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 48000:
                raise ClientError(
                    400,
                    "invalid_value",
                    f"rate {rate!r}: give a sample rate in Hz, 8000-48000 (OpenAI sends 24000)",
                    "session.audio.input.format.rate",
                )
            self.encoding, self.rate = "pcm16", rate
        elif t in ("audio/pcmu", "audio/pcma"):
            self.encoding, self.rate = ("ulaw" if t == "audio/pcmu" else "alaw"), 8000
        else:
            raise ClientError(
                400,
                "invalid_value",
                f"audio format {t!r}: use audio/pcm, audio/pcmu or audio/pcma",
                "session.audio.input.format.type",
            )

    def _transcription(self, t: Any, param: str) -> None:
        if t is None:
            return
        t = _object(t, param)
        for key in ("model", "language", "prompt"):
            if t.get(key) is not None and not isinstance(t[key], str):
                raise ClientError(400, "invalid_type", f"{param}.{key} must be a string", f"{param}.{key}")
        if t.get("model"):
            self.model = t["model"]
        if "language" in t:
            self.language = t["language"] or None
        if t.get("prompt"):
            self.prompt = str(t["prompt"])  # accepted and ignored: CTC models take no prompt

    def _turns(self, td: Any, param: str) -> None:
        if td is None:
            self.turns = None
            return
        if not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
            raise ClientError(400, "invalid_value", "turn_detection: null, or {'type': 'server_vad', ...}", param)
        silence = td.get("silence_duration_ms", 500)
        prefix = td.get("prefix_padding_ms", 300)
        for name, v in (("silence_duration_ms", silence), ("prefix_padding_ms", prefix)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 10_000:
                raise ClientError(400, "invalid_value", f"{name} must be 0-10000 ms", f"{param}.{name}")
        threshold = td.get("threshold", 0.5)
        if threshold is None:
            threshold = 0.5
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise ClientError(400, "invalid_value", "threshold must be a number from 0 to 1", f"{param}.threshold")
        # semantic_vad has no parameters of ours: it is served as server_vad with its defaults.
        # threshold is echoed, not used: the VAD here decides by WebRTC's model and the noise floor.
        self.turns = TurnDetection(silence_s=max(0.1, silence / 1000), prefix_s=prefix / 1000)
        self.threshold = float(threshold)


def _object(v: Any, param: str) -> dict[str, Any]:
    """An optional JSON object field: {} when absent, ClientError when not an object."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ClientError(400, "invalid_type", f"{param} must be an object", param)
    return v


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    state = ws.app.state.service
    hub = state.live
    settings = state.settings
    intent = ws.query_params.get("intent")
    protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    await ws.accept(subprotocol="realtime" if "realtime" in protocols else None)  # browsers need one picked
    outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTBOX)
    sender = asyncio.create_task(_send_loop(ws, outbox))
    try:
        if intent not in (None, "transcription"):
            raise Refused(
                "invalid_intent",
                f"intent={intent!r}: this server serves transcription sessions only (intent=transcription)",
                1008,
            )
        client = client_key(ws.scope, bool(settings.all_api_keys()))
        try:
            hub.admit("realtime", client)
        except ServiceError as e:  # all sessions taken, or the client's quota: try again later
            raise Refused(e.code, e.message, 1013) from e
        try:
            preset = ws.query_params.get("preset") or None
            if preset is not None and preset not in PRESETS:
                raise Refused("invalid_preset", f"preset={preset!r}: use one of {', '.join(PRESETS)}", 1008)
            provisional = ws.query_params.get("provisional", "").lower() in ("1", "true")
            lookahead = ws.query_params.get("lookahead")
            try:
                lookahead_s = float(lookahead) if lookahead is not None else None
            except ValueError:
                raise Refused("invalid_lookahead", f"lookahead={lookahead!r}: give seconds, e.g. 0.48", 1008) from None
            await _serve(ws, hub, settings, outbox, preset, provisional, lookahead_s, client)
            hub.metrics.stream("realtime", "ok")
        finally:
            hub.release(client)
    except Refused as r:
        log.info("realtime session closed: %s (%s)", r.code, r.message)
        _put_last(outbox, error_event(r.code, r.message))
        await _close(ws, outbox, sender, r.close, r.message)
        return
    except WebSocketDisconnect:
        hub.metrics.stream("realtime", "ok")
    except Exception:
        log.exception("realtime session failed")
        hub.metrics.stream("realtime", "error")
        _put_last(outbox, error_event("server_error", "internal error; the server log has the details"))
        await _close(ws, outbox, sender, 1011, "internal error")
        return
    await _close(ws, outbox, sender, 1000, "")


def _put(outbox: asyncio.Queue[dict[str, Any] | None], ev: dict[str, Any]) -> None:
    try:
        outbox.put_nowait(ev)
    except asyncio.QueueFull:
        raise Refused("client_not_reading", f"the client has not read its last {OUTBOX} events", 1008) from None


def _put_last(outbox: asyncio.Queue[dict[str, Any] | None], ev: dict[str, Any]) -> None:
    """The event before a close: it must go in, so a full outbox (a client that does not read)
    drops what it holds; the client was not going to read that anyway."""
    while outbox.full():
        outbox.get_nowait()
    outbox.put_nowait(ev)


async def _send_loop(ws: WebSocket, outbox: asyncio.Queue[dict[str, Any] | None]) -> None:
    with contextlib.suppress(Exception):  # a client gone mid-send: the reader sees the disconnect
        while (ev := await outbox.get()) is not None:
            await ws.send_text(json.dumps(ev, ensure_ascii=False))


async def _close(
    ws: WebSocket, outbox: asyncio.Queue[dict[str, Any] | None], sender: asyncio.Task[None], code: int, reason: str
) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        outbox.put_nowait(None)
    try:
        await asyncio.wait_for(sender, 2.0)  # the error event goes out before the close
    except (TimeoutError, asyncio.CancelledError):
        sender.cancel()
    if ws.application_state != WebSocketState.DISCONNECTED and ws.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await ws.close(code, reason[:120])


async def _serve(
    ws: WebSocket,
    hub: Any,
    settings: Any,
    outbox: asyncio.Queue[dict[str, Any] | None],
    preset: str | None,
    provisional: bool,
    lookahead_s: float | None,
    client: str,
) -> None:
    registry = hub.registry
    cfg = Config("default")
    sid = "sess_" + secrets.token_hex(10)
    _put(outbox, {"type": "session.created", "event_id": event_id(), "session": cfg.session(sid)})
    max_bytes = int(settings.stream_max_message_mb * 2**20)
    max_samples = int(settings.stream_max_session_s * 16000)

    async def emit(ev: LiveEvent) -> None:
        for out in _server_events(ev):
            _put(outbox, out)

    while True:  # one LiveSession per model/format choice; a session.update that changes them starts a new one
        try:
            entry = registry.resolve(served_model(registry, cfg.model), cfg.language)
            opened = hub.session(
                entry, emit, preset=preset, turns=cfg.turns, provisional=provisional, lookahead_s=lookahead_s
            )
            live = await opened.__aenter__()
        except ServiceError as e:  # the model is missing, failed or loading
            close = 1013 if e.status == 503 else 1008 if e.status < 500 else 1011
            raise Refused(e.code, e.message, close) from e
        try:
            audio = LiveAudio(cfg.encoding, cfg.rate, live.rate)
            max_samples = int(settings.stream_max_session_s * live.rate)
            restart = await _read_loop(
                ws,
                cfg,
                sid,
                live,
                audio,
                outbox,
                max_bytes,
                max_samples,
                settings.stream_idle_timeout_s,
                hub,
                client,
            )
        finally:
            await opened.__aexit__(None, None, None)
        if not restart:
            return


async def _read_loop(
    ws: WebSocket,
    cfg: Config,
    sid: str,
    live: LiveSession,
    audio: LiveAudio,
    outbox: asyncio.Queue[dict[str, Any] | None],
    max_bytes: int,
    max_samples: int,
    idle_s: float,
    hub: LiveHub,
    client: str,
) -> bool:
    """Client events until the connection ends (False) or the session must be rebuilt (True)."""
    while True:
        try:
            msg = await hub.unless_finishing(ws.receive(), idle_s)  # a cancelled receive loses nothing
        except TimeoutError:
            raise Refused("idle_timeout", f"no message for {idle_s:g} s (ASR_STREAM_IDLE_TIMEOUT_S)", 1008) from None
        if msg is None:  # the server is draining and this session's time is up (service.drain)
            await live.commit()  # the turn in progress ends: its final transcript goes out first
            raise Refused("server_restarting", "the server is restarting: reconnect to go on", 1012)
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        text = msg.get("text")
        if text is None:
            _put(outbox, error_event("invalid_event", "binary messages are not accepted: send JSON text events"))
            continue
        if len(text) > max_bytes:
            raise Refused(
                "message_too_large",
                f"a message of {len(text)} bytes exceeds {max_bytes} (ASR_STREAM_MAX_MESSAGE_MB)",
                1009,
            )
        try:
            ev = json.loads(text)
        except json.JSONDecodeError as e:
            _put(outbox, error_event("invalid_json", f"the message is not valid JSON: {e.msg} at position {e.pos}"))
            continue
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            _put(outbox, error_event("invalid_event", "an event is a JSON object with a string 'type'", "type"))
            continue
        etype, eid = ev["type"], ev.get("event_id")
        try:
            if etype == "input_audio_buffer.append":
                await _append(ev, audio, live, hub, client, max_samples)
            elif etype == "input_audio_buffer.commit":
                if live.pending_samples < MIN_COMMIT_MS * live.rate // 1000:
                    got = live.pending_samples * 1000 / live.rate
                    raise ClientError(
                        400,
                        "input_audio_buffer_commit_empty",
                        f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, got {got:.0f} ms",
                    )
                await live.commit()
            elif etype == "input_audio_buffer.clear":
                live.clear()
                _put(outbox, {"type": "input_audio_buffer.cleared", "event_id": event_id()})
            elif etype in ("session.update", "transcription_session.update"):
                s = ev.get("session")
                if not isinstance(s, dict):
                    raise ClientError(400, "invalid_value", f"{etype} needs a 'session' object", "session")
                before = (cfg.model, cfg.language, cfg.encoding, cfg.rate)
                new = copy.copy(cfg)
                new.update(s, beta=etype.startswith("transcription_session"))
                if (new.model, new.language) != before[:2]:  # an unknown model is refused here, settings kept
                    hub.registry.resolve(served_model(hub.registry, new.model), new.language)
                cfg.__dict__.update(new.__dict__)
                reply = "transcription_session.updated" if cfg.beta else "session.updated"
                if before != (cfg.model, cfg.language, cfg.encoding, cfg.rate):
                    _put(outbox, {"type": reply, "event_id": event_id(), "session": cfg.session(sid)})
                    await live.commit()  # what was said so far is finished under the old settings
                    return True
                live.set_turn_detection(cfg.turns)
                _put(outbox, {"type": reply, "event_id": event_id(), "session": cfg.session(sid)})
            else:
                raise ClientError(
                    400, "unknown_event", f"event type {etype!r} is not supported by this transcription server", "type"
                )
        except ClientError as e:
            _put(outbox, error_event(e.code, e.message, e.param, eid))


async def _append(
    ev: dict[str, Any], audio: LiveAudio, live: LiveSession, hub: LiveHub, client: str, max_samples: int
) -> None:
    """``input_audio_buffer.append``: decode, feed the session, charge the client's audio quota."""
    data = ev.get("audio")
    if not isinstance(data, str):
        raise ClientError(400, "invalid_value", "input_audio_buffer.append needs 'audio': base64 audio bytes", "audio")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "invalid_value", "'audio' is not valid base64", "audio") from None
    try:
        x = audio.decode(raw)
    except AudioFormatError as e:
        raise ClientError(400, "invalid_audio", str(e), "audio") from None
    await live.append(x)
    try:
        hub.quotas.charge(client, x.shape[0] / live.rate)
    except ClientError as e:  # the client's audio quota ran dry: its turn ends, then the session
        await live.commit()
        raise Refused(e.code, e.message, 1013) from e
    if live.samples_in > max_samples:
        raise Refused("session_expired", "the session reached its maximum length (ASR_STREAM_MAX_SESSION_S)", 1008)


def _server_events(ev: LiveEvent) -> list[dict[str, Any]]:
    base = {"event_id": event_id(), "item_id": ev.item}
    if ev.kind == "speech_started":
        return [{"type": "input_audio_buffer.speech_started", **base, "audio_start_ms": ev.audio_ms}]
    if ev.kind == "speech_stopped":
        return [{"type": "input_audio_buffer.speech_stopped", **base, "audio_end_ms": ev.audio_ms}]
    if ev.kind == "committed":
        item = {"id": ev.item, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
        return [
            {"type": "input_audio_buffer.committed", **base, "previous_item_id": ev.previous},
            {"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": ev.previous, "item": item},
        ]
    if ev.kind == "delta":
        return [{"type": f"{ITEM}.delta", **base, "content_index": 0, "delta": ev.text}]
    if ev.kind == "provisional":
        return [{"type": f"{ITEM}.provisional", **base, "content_index": 0, "text": ev.text}]
    usage = {"type": "duration", "seconds": round(ev.seconds, 3)}
    return [{"type": f"{ITEM}.completed", **base, "content_index": 0, "transcript": ev.text, "usage": usage}]
