"""Cache-aware FastConformer streaming against NeMo's own (``conformer_stream_step``).

Two NeMo-built random cache-aware models (chunked_limited attention with four lookaheads,
causal convolutions and downsampling; one CTC, one hybrid RNNT/CTC) are exported with their
streaming graphs; for every lookahead and file, the runtime's features per step, each step's
log-probs (within 1e-3), every label and the text must equal NeMo's cache-aware streaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf

from service.live.cache_aware import CacheAwareGraph, CacheAwareStream, step
from service.models import ModelPackage, Recognizer
from tests.conftest import NemoModel, build_nemo_model, run_nemo_cached, speech_files

TOL = 1e-3


@pytest.fixture(scope="session", params=["streaming", "streaming_hybrid"])
def cache_aware(request: pytest.FixtureRequest, speech_dir: Path) -> NemoModel:
    return build_nemo_model(request.param, speech_files(speech_dir))


def reference(m: NemoModel) -> tuple[list[Path], dict[str, Any], dict[str, np.ndarray]]:
    files = [f for f in m.files if f.name.startswith(("speech_0", "edge_", "noise_white"))]
    work = run_nemo_cached(
        f"cache-aware-{m.arch}",
        [*files, m.nemo_path],
        [
            ["-m", "tests.nemo_side.cache_aware_ref", "--nemo", str(m.nemo_path), "--out", "{work}"]
            + [str(f) for f in files]
        ],
    )
    with np.load(work / "cache_aware.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return files, json.loads((work / "cache_aware.json").read_text()), arrays


def test_streams_equal_nemo_step_by_step(cache_aware: NemoModel) -> None:
    files, ref, z = reference(cache_aware)
    rec = Recognizer(ModelPackage.open(cache_aware.model_dir, cache_aware.tokens_dir, cache_aware.name))
    streaming = rec.package.manifest.streaming
    assert streaming is not None and [g.att_context_size[1] for g in streaming.graphs] == [13, 6, 1, 0]
    pkg_dir = cache_aware.model_dir / cache_aware.name
    rng = np.random.default_rng(3)
    for spec in streaming.graphs:
        key = f"r{spec.att_context_size[1]}"
        graph = CacheAwareGraph(pkg_dir / spec.file, spec)
        for fi, f in enumerate(files):
            x, _ = sf.read(str(f), dtype="float32")
            stream = CacheAwareStream(rec.features, spec, rec.blank_id)
            block = int(rng.integers(160, 6000))
            inputs = []
            for i in range(0, x.shape[0], block):
                inputs += stream.push(x[i : i + block])
            inputs += stream.finish()
            n_ref = sum(1 for k in z if k.startswith(f"{key}_{fi}_") and k.endswith("_in"))
            assert len(inputs) == n_ref, f"{key} {f.name}: {len(inputs)} steps, NeMo {n_ref}"
            for s, (inp, final) in enumerate(inputs):
                np.testing.assert_allclose(inp, z[f"{key}_{fi}_{s}_in"], atol=TOL, err_msg=f"{key} {f.name} step {s}")
                lp = step(graph, stream, inp, final)
                kept = lp if final else lp[: spec.valid_out_len]
                np.testing.assert_allclose(kept, z[f"{key}_{fi}_{s}_lp"], atol=TOL, err_msg=f"{key} {f.name} step {s}")
            assert stream.labels == z[f"{key}_{fi}_labels"].tolist(), f"{key} {f.name}"
            assert rec.detokenize(stream.ids) == ref["texts"][key][fi], f"{key} {f.name}"
    assert any(t.strip() for texts in ref["texts"].values() for t in texts)


def test_streaming_graphs_carry_what_sherpa_onnx_reads(cache_aware: NemoModel, speech_dir: Path) -> None:
    import sherpa_onnx

    m = ModelPackage.open(cache_aware.model_dir, cache_aware.tokens_dir, cache_aware.name).manifest
    assert m.streaming is not None
    pkg_dir = cache_aware.model_dir / cache_aware.name
    for spec in m.streaming.graphs:
        meta = ort.InferenceSession(str(pkg_dir / spec.file)).get_modelmeta().custom_metadata_map
        assert int(meta["window_size"]) == spec.chunk_frames + spec.pre_encode_cache
        assert int(meta["chunk_shift"]) == spec.chunk_frames
        assert [int(meta[f"cache_last_channel_dim{i}"]) for i in (1, 2, 3)] == spec.cache_last_channel
        assert [int(meta[f"cache_last_time_dim{i}"]) for i in (1, 2, 3)] == spec.cache_last_time
        assert int(meta["vocab_size"]) == m.vocabulary.size
    # The same files load in sherpa-onnx's online NeMo CTC recognizer, and it decodes with them.
    spec = m.streaming.graphs[0]
    tokens = cache_aware.tokens_dir / m.vocabulary.tokens_file
    recognizer = sherpa_onnx.OnlineRecognizer.from_nemo_ctc(model=str(pkg_dir / spec.file), tokens=str(tokens))
    s = recognizer.create_stream()
    x, sr = sf.read(str(speech_files(speech_dir)[0]), dtype="float32")
    s.accept_waveform(sr, x)
    s.accept_waveform(sr, np.zeros(sr, np.float32))
    s.input_finished()
    while recognizer.is_ready(s):
        recognizer.decode_stream(s)
    assert isinstance(recognizer.get_result(s), str)


def test_the_offline_graph_beside_them_equals_nemo(cache_aware: NemoModel) -> None:
    """The offline graph of a cache-aware model (its default lookahead) gives NeMo's transcribe() text."""
    rec = Recognizer(ModelPackage.open(cache_aware.model_dir, cache_aware.tokens_dir, cache_aware.name))
    for f, text in zip(cache_aware.files, cache_aware.transcripts, strict=True):
        x, _ = sf.read(str(f), dtype="float32")
        assert rec.transcribe([x])[0].text == text, f.name


def test_every_surface_streams_a_cache_aware_model_as_nemo_does(cache_aware: NemoModel) -> None:
    """Realtime (the openai SDK, a lookahead chosen per session) and Wyoming (the default
    lookahead) on the real server, finals from the stream: NeMo's cache-aware streamed text."""
    import asyncio
    import base64

    import websockets
    from openai import AsyncOpenAI
    from wyoming.asr import Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    from testkit.server import free_port, running_server
    from tests.test_api import model_env

    files, ref, _ = reference(cache_aware)
    pcm = {f.name: sf.read(str(f), dtype="int16")[0].tobytes() for f in files}
    port = free_port()
    env = model_env(cache_aware, ASR_STREAM_FINAL="stream", ASR_WYOMING_PORT=str(port))

    async def realtime(url: str, data: bytes, lookahead: str) -> str:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        query = {"intent": "transcription", "lookahead": lookahead}
        async with client.realtime.connect(extra_query=query) as conn:
            fmt = {"type": "audio/pcm", "rate": 16000}
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"format": fmt, "turn_detection": None}}}
            )
            for i in range(0, len(data), 3200):
                await conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + 3200]).decode())
            await conn.input_audio_buffer.commit()
            async for ev in conn:
                assert ev.type != "error", ev
                if ev.type == "conversation.item.input_audio_transcription.completed":
                    return ev.transcript
        raise AssertionError("no completed event")

    async def wyoming(data: bytes) -> str:
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            for i in range(0, len(data), 3200):
                await c.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=data[i : i + 3200]).event())
            await c.write_event(AudioStop().event())
            while (ev := await c.read_event()) is not None:
                if Transcript.is_type(ev.type):
                    return Transcript.from_event(ev).text
        raise AssertionError("no transcript")

    async def refused(url: str, lookahead: str) -> tuple[list[str], int | None]:
        q = f"intent=transcription&lookahead={lookahead}"
        got: list[str] = []
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/realtime?" + q) as ws:
            try:
                while True:
                    ev = json.loads(await ws.recv())
                    got.append(ev["error"]["code"] if ev["type"] == "error" else ev["type"])
            except websockets.ConnectionClosed as e:
                return got, e.rcvd.code if e.rcvd else None

    with running_server(env) as url:
        for fi, f in enumerate(files):
            assert asyncio.run(realtime(url, pcm[f.name], "0.48")) == ref["texts"]["r6"][fi].strip(), f.name
            assert asyncio.run(wyoming(pcm[f.name])) == ref["texts"]["r13"][fi].strip(), f.name
        assert asyncio.run(refused(url, "0.5")) == (["session.created", "invalid_lookahead"], 1008)
