"""Live transcription against NeMo's own buffered CTC streaming (``FrameBatchASR``).

For every NeMo-built architecture (Conformer, FastConformer, character, hybrid RNNT/CTC,
Devanagari), the three presets and both initial buffer fills (NeMo's 0.0, and the
silence level the service uses), ``service.live.buffered`` must keep the same label on every
kept frame as NeMo does, and so give the same text. Then the same through the real server:
an OpenAI Realtime session (the official SDK) whose completed transcript is the stream's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from service.live.buffered import (
    NEMO_FILL,
    PRESETS,
    SILENCE_FILL,
    BufferedCtcStream,
    Geometry,
    Preset,
    transcribe_buffered,
)
from service.models import ModelPackage, Recognizer
from testkit.server import running_server
from tests.conftest import NemoModel, run_nemo_cached
from tests.test_api import model_env

REF_PRESETS = [f"{p.chunk_s}:{p.buffer_s}" for p in PRESETS.values()]  # "wide" is NeMo's script defaults
FILLS = {"nemo": NEMO_FILL, "silence": SILENCE_FILL}


def streaming_files(m: NemoModel) -> list[Path]:
    """Speech of several lengths (0.5 s to the longest clip), noise, and an odd sample count."""
    names = {f.name for f in m.files}
    picked = [f for f in m.files if f.name.startswith(("speech_00", "speech_03", "speech_hi_01", "speech_hi_04"))]
    picked += [f for f in m.files if f.name in {"edge_0p5s.wav", "edge_odd_12345.wav", "noise_white_2s.wav"}]
    picked.append(max(m.files, key=lambda f: sf.info(str(f)).frames))
    assert len(picked) >= 6, names
    return sorted(set(picked))


def buffered_reference(m: NemoModel) -> tuple[list[Path], dict[str, Any]]:
    files = streaming_files(m)
    work = run_nemo_cached(
        f"buffered-{m.arch}",
        [*files, m.nemo_path],
        [
            ["-m", "tests.nemo_side.buffered_ref", "--nemo", str(m.nemo_path), "--out", "{work}"]
            + [a for p in REF_PRESETS for a in ("--preset", p)]
            + [str(f) for f in files]
        ],
    )
    return files, json.loads((work / "buffered.json").read_text())


def test_buffered_streaming_equals_nemo_frame_by_frame(nemo_model: NemoModel) -> None:
    files, ref = buffered_reference(nemo_model)
    rec = Recognizer(ModelPackage.open(nemo_model.model_dir, nemo_model.tokens_dir, nemo_model.name))

    def run(batch: np.ndarray) -> np.ndarray:
        return rec.engine.run(batch, np.full(batch.shape[0], batch.shape[2], np.int64))

    rng = np.random.default_rng(7)
    for key, rows in ref.items():
        preset, fill = key.split("/")
        chunk_s, buffer_s = (float(v) for v in preset.split(":"))
        g = Geometry.of(Preset(key, chunk_s, buffer_s, ""), rec.features, rec.subsampling.factor)
        for f, row in zip(files, rows, strict=True):
            assert row["file"] == f.name
            x, _ = sf.read(str(f), dtype="float32")
            stream = BufferedCtcStream(rec.features, g, rec.blank_id, fill=FILLS[fill], record=True)
            # Blocks of random sizes: the result must not depend on how the audio arrives.
            ids = transcribe_buffered(run, stream, x, block=int(rng.integers(160, 8000)))
            assert stream.kept == row["unmerged"], f"{key} {f.name}: kept labels differ from NeMo's"
            assert rec.detokenize(ids) == row["text"], f"{key} {f.name}"
    assert any(r["text"].strip() for rows in ref.values() for r in rows)  # not all silence


def test_realtime_session_streams_nemo_text(conformer: NemoModel) -> None:
    """The server, an OpenAI SDK client, manual turns, finals from the stream: NeMo's text."""
    from openai import AsyncOpenAI

    files, ref = buffered_reference(conformer)
    fast = PRESETS["fast"]
    expected = {r["file"]: r["text"] for r in ref[f"{fast.chunk_s}:{fast.buffer_s}/silence"]}
    env = model_env(conformer, ASR_STREAM_FINAL="stream", ASR_STREAM_PRESET="fast")

    async def session(url: str, x: np.ndarray) -> tuple[str, str]:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        pcm = (np.clip(x, -1, 1) * 32768).clip(-32768, 32767).astype("<i2").tobytes()
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(
                session={
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}},
                }
            )
            for i in range(0, len(pcm), 6400):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 6400]).decode())
            await conn.input_audio_buffer.commit()
            deltas = ""
            async for ev in conn:
                if ev.type == "conversation.item.input_audio_transcription.delta":
                    deltas += ev.delta or ""
                if ev.type == "conversation.item.input_audio_transcription.completed":
                    return deltas, ev.transcript
                assert ev.type != "error", ev
        raise AssertionError("no completed event")

    with running_server(env) as url:
        for f in files:
            x, _ = sf.read(str(f), dtype="int16")
            deltas, text = asyncio.run(session(url, x.astype(np.float32) / 32768))
            assert text == expected[f.name].strip(), f.name
            assert deltas == text or text.startswith(deltas.strip()), f.name  # append-only, then the rest
