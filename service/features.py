"""NeMo's ``AudioToMelSpectrogramPreprocessor`` (eval mode) in numpy.

Reproduces ``nemo.collections.asr.parts.preprocessing.features.FilterbankFeatures.forward``
with dither 0 and pad_to 0 (what ``transcribe()`` uses), driven by the ``features`` section
of a package's ``model.json``:

    pre-emphasis -> STFT (centered, symmetric window zero-padded to n_fft) -> |X|^mag_power
    -> Slaney mel filterbank -> log(x + guard) -> per-feature normalization over valid frames

Two framing conventions exist (``framing`` in model.json):

* ``zero_pad`` (NeMo >= 2.5): the STFT pads with zeros, pre-emphasis is masked past the
  signal length, and ``L // hop`` frames are valid.
* ``reflect_pad`` (earlier NeMo): the STFT pads by reflection and ``L // hop + 1`` frames are
  valid.

Each signal is featurized on its own, so results do not depend on what it is batched with
(under ``zero_pad`` this is also what NeMo computes inside a padded batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

NORMALIZE_EPS = 1e-5  # NeMo's CONSTANT added to the standard deviation
_WINDOWS = {"hann": np.hanning, "hamming": np.hamming, "blackman": np.blackman, "bartlett": np.bartlett}
_BLOCK_FRAMES = 4096  # frames per STFT block: bounds temporaries for long inputs


class FeatureConfig(BaseModel):
    """The ``features`` section of model.json (written by export_to_onnx.py, read through
    ``service.package.Manifest``): NeMo's preprocessor parameters as the export read them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_rate: int
    window_size_s: float | None = None  # as NeMo's config gives them; win_length/hop_length rule
    window_stride_s: float | None = None
    win_length: int
    hop_length: int
    n_fft: int
    window: str = "hann"
    n_mels: int
    lowfreq: float = 0.0
    highfreq: float | None = None
    mel_norm: str | None = "slaney"
    preemph: float | None = 0.97
    mag_power: float = 2.0
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float = 2.0**-24
    normalize: str | None = "per_feature"
    pad_value: float = 0.0
    exact_pad: bool = False
    framing: str = "zero_pad"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        return cls.model_validate(d)

    @model_validator(mode="after")
    def _check(self) -> FeatureConfig:
        self.check()
        return self

    def check(self) -> None:
        """Refuse parameters the numpy preprocessor does not reproduce."""
        if self.window not in _WINDOWS and self.window != "none":
            raise ValueError(f"unsupported window {self.window!r}")
        if self.mel_norm not in ("slaney", None):
            raise ValueError(f"unsupported mel_norm {self.mel_norm!r}")
        if self.normalize not in ("per_feature", "all_features", None):
            raise ValueError(f"unsupported normalize {self.normalize!r}")
        if self.log_zero_guard_type not in ("add", "clamp"):
            raise ValueError(f"unsupported log_zero_guard_type {self.log_zero_guard_type!r}")
        if self.framing not in ("zero_pad", "reflect_pad"):
            raise ValueError(f"unsupported framing {self.framing!r}")
        if self.win_length > self.n_fft:
            raise ValueError("win_length must not exceed n_fft")


def _hz_to_mel(f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Slaney's mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, norm: str | None
) -> npt.NDArray[np.float32]:
    """Triangular mel filters, [n_mels, n_fft // 2 + 1], as ``librosa.filters.mel`` builds them.

    Written out (30 lines) rather than importing librosa, whose numba/scipy/scikit-learn
    dependencies would triple the runtime image for one matrix computed at load time. The
    test suite checks it against librosa itself; NeMo builds its filterbank with librosa.
    """
    weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":
        enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
        weights *= enorm[:, np.newaxis]
    return weights


_blas_limited = False


def single_threaded_blas() -> None:
    """Keep numpy's BLAS (OpenBLAS) to one thread in this process, once.

    The mel projection is a small GEMM (n_mels x 257 by 257 x frames) that OpenBLAS splits across
    every core; its worker threads then spin, waiting for more, long enough to take the cores from
    the ONNX Runtime run that follows. Measured on the medium shape, 10 s clip, 2 cores: features
    then ``session.run`` took 159 ms against 117 ms with one BLAS thread, and the features alone
    take 4-10 ms either way. ONNX Runtime is where the parallelism belongs. Process-wide (numpy's
    BLAS has one pool): the service computes nothing else with it.
    """
    global _blas_limited
    if not _blas_limited:
        threadpool_limits(limits=1, user_api="blas")
        _blas_limited = True


class FeatureExtractor:
    """Log-mel features for one model; immutable after construction, safe to share across threads."""

    def __init__(self, cfg: FeatureConfig):
        single_threaded_blas()
        self.cfg = cfg
        # Symmetric windows, like torch's periodic=False that NeMo uses.
        win = np.ones(cfg.win_length) if cfg.window == "none" else _WINDOWS[cfg.window](cfg.win_length)
        left = (cfg.n_fft - cfg.win_length) // 2  # torch.stft centres a short window in n_fft
        padded = np.zeros(cfg.n_fft, dtype=np.float32)
        padded[left : left + cfg.win_length] = win.astype(np.float32)
        self._window = padded
        self._fb = mel_filterbank(
            cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.lowfreq, cfg.highfreq or cfg.sample_rate / 2, cfg.mel_norm
        )
        if cfg.exact_pad:
            self._edge_pad = (cfg.n_fft - cfg.hop_length) // 2  # applied before pre-emphasis, no STFT centring
            self._stft_pad = 0
        else:
            self._edge_pad = 0
            self._stft_pad = cfg.n_fft // 2

    @property
    def n_mels(self) -> int:
        return self.cfg.n_mels

    def num_frames(self, n_samples: int) -> int:
        """Valid feature frames for a signal of ``n_samples`` (NeMo's ``get_seq_len``)."""
        c = self.cfg
        pad_total = 2 * (self._edge_pad or self._stft_pad)
        n = (n_samples + pad_total - c.n_fft) // c.hop_length
        if c.framing == "reflect_pad":
            n += 1
        return max(0, n)

    def min_samples(self) -> int:
        """Shortest signal that yields at least two valid frames (normalization needs >= 2)."""
        c = self.cfg
        extra = 1 if c.framing == "reflect_pad" else 0
        return max(1, (2 - extra) * c.hop_length + c.n_fft - 2 * (self._edge_pad or self._stft_pad))

    def __call__(self, audio: npt.NDArray[np.float32], stats: NormStats | None = None) -> npt.NDArray[np.float32]:
        """Features [n_mels, num_frames(len(audio))] of one mono float32 signal.

        Normalized over the signal itself, or with ``stats`` gathered over a longer recording
        that ``audio`` is a window of (chunked long-audio inference).
        """
        feats = self.log_mel(audio)
        if stats is not None:
            return stats.apply(feats)
        return self._normalize(feats)

    def log_mel(self, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Log-mel features before normalization, [n_mels, num_frames(len(audio))]."""
        c = self.cfg
        x = np.asarray(audio, dtype=np.float32)
        length = x.shape[0]
        n_valid = self.num_frames(length)
        if n_valid <= 0:
            return np.zeros((c.n_mels, 0), dtype=np.float32)
        reflect = c.framing == "reflect_pad"
        if self._edge_pad:
            x = np.pad(x, self._edge_pad, mode="reflect" if reflect else "constant")
        if c.preemph is not None:
            y = np.empty_like(x)
            y[0] = x[0]
            y[1:] = x[1:] - np.float32(c.preemph) * x[:-1]
            if not reflect:
                y[length:] = 0.0  # NeMo >= 2.5 masks samples past the original length
            x = y
        if self._stft_pad:
            x = np.pad(x, self._stft_pad, mode="reflect" if reflect else "constant")

        frames = np.lib.stride_tricks.sliding_window_view(x, c.n_fft)[:: c.hop_length][:n_valid]
        return self.frames_to_log_mel(frames)

    def frames_to_log_mel(self, frames: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Log-mel columns [n_mels, n] of ``frames`` [n, n_fft]: pre-emphasized, padded samples.

        The per-frame half of ``log_mel``, shared with live audio
        (``service.live.features.IncrementalLogMel``), which cuts its frames as samples arrive.
        """
        c = self.cfg
        n_valid = frames.shape[0]
        feats = np.empty((c.n_mels, n_valid), dtype=np.float32)
        for start in range(0, n_valid, _BLOCK_FRAMES):
            block = frames[start : start + _BLOCK_FRAMES] * self._window
            spec = np.fft.rfft(block, n=c.n_fft, axis=-1)
            power = spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2
            if c.mag_power != 2.0:
                power = np.sqrt(power) ** np.float32(c.mag_power)
            feats[:, start : start + block.shape[0]] = self._fb @ power.T
        if c.log:
            g = np.float32(c.log_zero_guard_value)
            if c.log_zero_guard_type == "add":
                np.log(feats + g, out=feats)
            else:
                np.log(np.maximum(feats, g), out=feats)
        return feats

    def _normalize(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """NeMo's normalize_batch: mean and std (N-1) over valid frames, std + 1e-5.

        Accumulates in float64. NeMo sums in float32 in torch's reduction order, which only
        matters where a band is exactly constant (digital silence): there its rounding residue,
        divided by 1e-5, becomes a constant of order 0.1 whose value depends on the CPU's vector
        width; here the result is the exact 0. Everywhere else the two agree to ~1e-6.
        """
        n = x.shape[1]
        if self.cfg.normalize == "per_feature":
            mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
            dev = x - mean
            std = np.sqrt((dev**2).sum(axis=1, keepdims=True) / (n - 1)) if n > 1 else np.zeros_like(mean)
            return np.asarray(dev / (std + NORMALIZE_EPS), dtype=np.float32)
        if self.cfg.normalize == "all_features":
            mean_all = x.mean(dtype=np.float64)
            std_all = float(x.std(ddof=1, dtype=np.float64)) if x.size > 1 else 0.0
            return np.asarray((x - mean_all) / (std_all + NORMALIZE_EPS), dtype=np.float32)
        return x

    def batch(
        self, audios: list[npt.NDArray[np.float32]], stats: list[NormStats | None] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Padded batch [B, n_mels, T_max] (pad_value beyond each length) and lengths [B]."""
        feats = [self(a, s) for a, s in zip(audios, stats or [None] * len(audios), strict=True)]
        lengths = np.array([f.shape[1] for f in feats], dtype=np.int64)
        t_max = int(lengths.max()) if len(feats) else 0
        out = np.full((len(feats), self.cfg.n_mels, t_max), self.cfg.pad_value, dtype=np.float32)
        for i, f in enumerate(feats):
            out[i, :, : f.shape[1]] = f
        return out, lengths


class NormStats:
    """Normalization statistics accumulated over a recording, window by window.

    Chunked inference runs the encoder on overlapping windows of a long recording. Normalizing
    each window over itself would give each window a slightly different feature scale;
    instead the whole recording's mean and deviation are gathered first (a cheap pass: log-mel
    only) and every window is normalized with them, as NeMo normalizes the unchunked input.
    """

    def __init__(self, normalize: str | None, n_mels: int):
        self.normalize = normalize
        self.n = 0
        self.sum = np.zeros((n_mels, 1), dtype=np.float64)
        self.sumsq = np.zeros((n_mels, 1), dtype=np.float64)

    def add(self, log_mel: npt.NDArray[np.float32]) -> None:
        x = log_mel.astype(np.float64)
        self.n += x.shape[1]
        self.sum += x.sum(axis=1, keepdims=True)
        self.sumsq += (x**2).sum(axis=1, keepdims=True)

    def apply(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.normalize is None or self.n < 2:
            return x
        if self.normalize == "per_feature":
            n, s, ss = self.n, self.sum, self.sumsq
        else:  # all_features
            n, s, ss = self.n * self.sum.shape[0], self.sum.sum(), self.sumsq.sum()
        mean = s / n
        std = np.sqrt(np.maximum(ss - n * mean**2, 0.0) / (n - 1))
        return np.asarray((x - mean) / (std + NORMALIZE_EPS), dtype=np.float32)
