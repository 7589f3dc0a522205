"""The live engine in process: incremental features, bounded stream state, turns, events."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from service.features import FeatureConfig, FeatureExtractor
from service.live.batcher import StepBatcher
from service.live.buffered import PRESETS, BufferedCtcStream, Geometry
from service.live.features import IncrementalLogMel, StreamingUnsupported
from service.live.session import LiveEvent, LiveSession, TurnDetection
from service.models import ModelPackage, Recognizer
from testkit.nemo import ROOT
from testkit.speech import SENTENCES, synthesize


@pytest.fixture(scope="module")
def rec() -> Recognizer:
    return Recognizer(ModelPackage.open(ROOT / "models", ROOT / "tokens", "en_synth_conformer_ctc"))


@pytest.mark.parametrize("n", [1, 159, 160, 511, 512, 513, 16000, 16001, 48123])
def test_incremental_features_equal_offline(rec: Recognizer, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (0.1 * rng.standard_normal(n)).astype(np.float32)
    ref = rec.features.log_mel(x)
    inc = IncrementalLogMel(rec.features)
    parts, i = [], 0
    while i < n:
        k = int(rng.integers(1, 2000))
        parts.append(inc.push(x[i : i + k]))
        i += k
    parts.append(inc.finish())
    got = np.concatenate(parts, axis=1)
    assert got.shape == ref.shape
    if ref.size:
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)  # BLAS blocking differs, ~1e-6


def test_incremental_features_hold_under_n_fft_samples(rec: Recognizer) -> None:
    inc = IncrementalLogMel(rec.features)
    x = np.zeros(16000 * 30, np.float32)
    for i in range(0, x.shape[0], 1000):
        inc.push(x[i : i + 1000])
        assert inc._y.shape[0] < rec.features.cfg.n_fft + 1000 + rec.features.cfg.hop_length


def test_older_framing_is_refused_with_a_reason(rec: Recognizer) -> None:
    cfg = FeatureConfig.model_validate({**rec.features.cfg.model_dump(), "framing": "reflect_pad"})
    with pytest.raises(StreamingUnsupported, match="zero_pad"):
        IncrementalLogMel(FeatureExtractor(cfg))


def test_stream_state_stays_bounded(rec: Recognizer) -> None:
    """Ten minutes through one stream: the buffers do not grow; only the token ids do."""
    g = Geometry.of(PRESETS["fast"], rec.features, rec.subsampling.factor)
    st = BufferedCtcStream(rec.features, g, rec.blank_id)
    rng = np.random.default_rng(0)
    labels = np.full(g.buffer_frames // rec.subsampling.factor, rec.blank_id, np.int64)
    for _ in range(600):
        for _buf in st.push((0.01 * rng.standard_normal(16000)).astype(np.float32)):
            st.accept(labels)
        assert st._pending.shape[1] < g.chunk_frames + 100
        assert st.mel._y.shape[0] < 2 * rec.features.cfg.n_fft
    assert st.steps == st.mel.frames // g.chunk_frames  # every complete chunk became a step
    assert st.kept_frames == st.steps * g.tokens_per_chunk


def test_presets_cost_what_they_say(rec: Recognizer) -> None:
    for p in PRESETS.values():
        g = Geometry.of(p, rec.features, rec.subsampling.factor)
        assert g.chunk_frames * 0.01 == pytest.approx(p.chunk_s)
        assert g.tokens_per_chunk * g.model_stride_s == pytest.approx(p.chunk_s)
        # NeMo's ceil() of a float quotient: at most one encoder frame past the chunk + right context
        late = g.delay * g.model_stride_s - (p.chunk_s + (p.buffer_s - p.chunk_s) / 2)
        assert -1e-9 < late < g.model_stride_s + 1e-9


def _speech(tmp: Path, texts: list[str], pause_s: float) -> tuple[np.ndarray, list[str]]:
    parts = []
    for i, t in enumerate(texts):
        x, _ = sf.read(synthesize(t, "en-us", 160, tmp / f"t{i}.wav"), dtype="float32")
        parts += [x, np.zeros(int(pause_s * 16000), np.float32)]
    return np.concatenate(parts), texts


def test_session_turns_deltas_and_finals(rec: Recognizer, tmp_path: Path) -> None:
    """Server VAD finds each sentence as a turn; deltas are append-only; finals are the offline text."""
    audio, _ = _speech(tmp_path, SENTENCES[:3], pause_s=1.0)
    events: list[LiveEvent] = []
    offline: list[np.ndarray] = []

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = StepBatcher(rec, pool)

            async def emit(ev: LiveEvent) -> None:
                events.append(ev)

            async def offline_text(x: np.ndarray) -> str:
                offline.append(x)
                return rec.transcribe([x])[0].text

            s = LiveSession(rec, batcher, emit, offline_text, preset=PRESETS["fast"], turns=TurnDetection(0.5, 0.3))
            for i in range(0, audio.shape[0], 1600):
                await s.append(audio[i : i + 1600])
            await batcher.stop()

    asyncio.run(main())
    kinds = [e.kind for e in events]
    assert kinds.count("speech_started") == 3 and kinds.count("completed") == 3, kinds
    items = list(dict.fromkeys(e.item for e in events))
    assert len(items) == 3
    for item, x in zip(items, offline, strict=True):
        mine = [e for e in events if e.item == item]
        order = [e.kind for e in mine]
        assert order[0] == "speech_started" and order[-1] == "completed"
        assert order.index("speech_stopped") < order.index("committed") < order.index("completed")
        assert "delta" in order  # words went out while the sentence was spoken
        completed = mine[-1]
        assert completed.text == rec.transcribe([x])[0].text.strip()
        # The turn's audio; the final pass hears its speech with the long-audio padding, not the
        # client's prefix padding and the whole silence after it.
        assert completed.seconds > x.shape[0] / 16000
    starts = [e.audio_ms for e in events if e.kind == "speech_started"]
    assert starts == sorted(starts) and starts[0] < 300
    committed = [e for e in events if e.kind == "committed"]
    assert committed[0].previous is None and committed[1].previous == items[0]


def test_g711_tables_are_itu_s() -> None:
    """The mu-law and A-law decoders against Python's audioop (present up to Python 3.12)."""
    audioop = pytest.importorskip("audioop")  # the runtime's Python (3.11/3.12) has it
    from service.live.audio_in import ALAW, ULAW

    codes = bytes(range(256))
    np.testing.assert_array_equal(ULAW * 32768, np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2"))
    np.testing.assert_array_equal(ALAW * 32768, np.frombuffer(audioop.alaw2lin(codes, 2), "<i2"))


def test_an_unloaded_model_leaves_no_live_step_loop_behind() -> None:
    """When the registry unloads a model (memory budget), the live hub drops its step loop too:
    otherwise the loop would keep the recognizer (and a cache-aware model's graphs) in memory."""
    from service.config import Settings
    from service.live.hub import LiveHub
    from service.metrics import Metrics
    from service.pipeline import Pipeline
    from service.registry import ModelRegistry

    async def main() -> None:
        settings = Settings()
        metrics = Metrics()
        with ThreadPoolExecutor(1) as pool:
            registry = ModelRegistry(settings, metrics, pool)
            pipeline = Pipeline(settings, registry, metrics)
            hub = LiveHub(settings, registry, pipeline, metrics)
            entry = registry.entries[registry.default]

            async def emit(ev: LiveEvent) -> None:
                pass

            async with hub.session(entry, emit, turns=None) as s:
                await s.append(np.zeros(16000, np.float32))  # one step: the loop starts
            batcher = hub._batchers[entry.name]
            assert isinstance(batcher, StepBatcher) and batcher._task is not None
            registry._unload(entry, "unloaded to make room (test)")
            await asyncio.sleep(0.05)
            assert entry.name not in hub._batchers and batcher._task.done()
            await registry.stop()
            pipeline.close()

    asyncio.run(main())
