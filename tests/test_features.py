"""Features against independent references: NeMo's own preprocessor under many configurations,
librosa's mel filterbank, and the pre-2.5 NeMo framing rebuilt on librosa's STFT."""

from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from service.features import FeatureConfig, FeatureExtractor, mel_filterbank
from tests.conftest import run_nemo_cached, speech_files

# AudioToMelSpectrogramPreprocessor kwargs; NeMo builds each, export_to_onnx reads it back.
NEMO_CONFIGS = [
    {},  # NeMo's defaults: 64 mels, 20 ms window, n_fft from the window
    {"features": 80, "window_size": 0.025, "window_stride": 0.01, "n_fft": 512},
    {"features": 80, "n_fft": 512, "exact_pad": True},
    {
        "features": 80,
        "window": "hamming",
        "normalize": "all_features",
        "log_zero_guard_type": "clamp",
        "log_zero_guard_value": "tiny",
    },
    {"features": 128, "window": "blackman", "normalize": "NA", "mag_power": 1.0, "lowfreq": 20, "highfreq": 7600},
    {"features": 80, "preemph": None, "log_zero_guard_value": "eps", "window_size": 0.032, "n_fft": 1024},
    {"sample_rate": 8000, "features": 40, "window_size": 0.025, "window_stride": 0.0125, "n_fft": 256},
]


@pytest.fixture(scope="module")
def nemo_features(speech_dir: Path) -> tuple[list[dict[str, object]], dict[str, np.ndarray], list[Path]]:
    files = [*speech_files(speech_dir)[:6], speech_dir / "edge_0p5s.wav", speech_dir / "edge_odd_16001.wav"]
    configs = speech_dir / "configs.json"
    configs.write_text(json.dumps(NEMO_CONFIGS))
    work = run_nemo_cached(
        "features",
        [*files, configs],
        [
            ["-m", "tests.nemo_side.features_ref", "--configs", str(configs), "--out", "{work}/feats.npz"]
            + [str(f) for f in files]
        ],
    )
    params = json.loads((work / "feats.json").read_text())
    with np.load(work / "feats.npz") as z:
        return params, {k: z[k] for k in z.files}, files


@pytest.mark.parametrize("c", range(len(NEMO_CONFIGS)))
def test_features_match_nemo_preprocessor_configs(nemo_features, c: int) -> None:  # type: ignore[no-untyped-def]
    params, arrays, files = nemo_features
    fe = FeatureExtractor(FeatureConfig.from_dict(params[c]))
    for i, f in enumerate(files):
        x, _ = sf.read(str(f), dtype="float32")
        ref = arrays[f"c{c}_f{i}"]
        ours = fe(x)
        assert ours.shape == ref.shape, (NEMO_CONFIGS[c], f.name)
        # Unnormalized log-mels are in natural log units (tens), normalized ones near unit scale.
        tol = 1e-3 if params[c]["normalize"] else 1e-3 * max(1.0, float(np.abs(ref).max()))
        assert np.abs(ours - ref).max() <= tol, (NEMO_CONFIGS[c], f.name)


@pytest.mark.parametrize(
    "sr,n_fft,n_mels,fmin,fmax,norm",
    [
        (16000, 512, 80, 0, 8000, "slaney"),
        (16000, 512, 64, 0, 8000, "slaney"),
        (16000, 512, 128, 20, 7600, "slaney"),
        (8000, 256, 40, 0, 4000, "slaney"),
        (16000, 400, 80, 0, 8000, None),
    ],
)
def test_mel_filterbank_matches_librosa(
    sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, norm: str | None
) -> None:
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, norm)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, norm=norm, htk=False)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def legacy_nemo_reference(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """NeMo < 2.5's featurizer, rebuilt from librosa and scipy: reflect-padded centred STFT,
    unmasked pre-emphasis, L // hop + 1 frames, per-feature normalization with N-1."""
    y = np.concatenate([x[:1], x[1:] - cfg.preemph * x[:-1]]) if cfg.preemph is not None else x
    window = scipy.signal.get_window("hann", cfg.win_length, fftbins=False)
    spec = librosa.stft(
        y.astype(np.float64),
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=window,
        center=True,
        pad_mode="reflect",
    )
    fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, norm="slaney")
    mel = np.log(fb.astype(np.float64) @ np.abs(spec) ** 2 + cfg.log_zero_guard_value)
    n = x.shape[0] // cfg.hop_length + 1
    mel = mel[:, :n]
    return (mel - mel.mean(axis=1, keepdims=True)) / (mel.std(axis=1, ddof=1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("n", [8000, 16001, 24000 + 77])
def test_reflect_pad_framing_matches_legacy_nemo(speech_dir: Path, n: int) -> None:
    x, _ = sf.read(str(speech_dir / "speech_02.wav"), dtype="float32")
    x = x[:n]
    cfg = FeatureConfig(sample_rate=16000, win_length=400, hop_length=160, n_fft=512, n_mels=80, framing="reflect_pad")
    ours = FeatureExtractor(cfg)(x)
    ref = legacy_nemo_reference(x, cfg)
    assert ours.shape == ref.shape == (80, n // 160 + 1)
    assert np.abs(ours - ref).max() <= 1e-3


def test_frame_counts_follow_framing() -> None:
    base = {"sample_rate": 16000, "win_length": 400, "hop_length": 160, "n_fft": 512, "n_mels": 80}
    new = FeatureExtractor(FeatureConfig(**base, framing="zero_pad"))
    old = FeatureExtractor(FeatureConfig(**base, framing="reflect_pad"))
    for n in (160, 161, 319, 320, 16000, 16159):
        assert new.num_frames(n) == n // 160
        assert old.num_frames(n) == n // 160 + 1
        assert new(np.zeros(n, dtype=np.float32)).shape == (80, n // 160)
    exact = FeatureExtractor(FeatureConfig(**base, exact_pad=True))
    for fe in (new, old, exact):  # the shortest input with the two frames normalization needs
        m = fe.min_samples()
        assert fe.num_frames(m) == 2 and fe.num_frames(m - 1) < 2


def test_silence_gives_finite_features() -> None:
    fe = FeatureExtractor(FeatureConfig(sample_rate=16000, win_length=400, hop_length=160, n_fft=512, n_mels=80))
    f = fe(np.zeros(16000, dtype=np.float32))
    # A constant band normalizes to exactly 0 (x - mean(x) with an exact mean).
    assert np.isfinite(f).all() and not f.any()


def test_batch_pads_with_pad_value_and_keeps_each_item() -> None:
    fe = FeatureExtractor(FeatureConfig(sample_rate=16000, win_length=400, hop_length=160, n_fft=512, n_mels=80))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (4000, 16000, 9999)]
    feats, lengths = fe.batch(xs)
    assert lengths.tolist() == [25, 100, 62]
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(feats[i, :, : lengths[i]], fe(x))
        assert not feats[i, :, lengths[i] :].any()
