"""Log-mel frames computed as audio arrives, equal to ``FeatureExtractor.log_mel`` of the whole.

Frame ``i`` of NeMo's features (centred STFT, ``zero_pad`` framing) covers samples
``[i*hop - n_fft/2, i*hop + n_fft/2)`` of the pre-emphasized signal, zeros outside it. It is
final once those samples are in; ``finish`` gives the last frames, whose windows reach past
the end, over zeros, as the offline computation does. State: under ``n_fft`` samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.features import FeatureExtractor


class StreamingUnsupported(ValueError):
    """The model's preprocessor settings have no streaming equivalent here."""


class IncrementalLogMel:
    """Unnormalized log-mel frames of a signal fed in blocks (one stream's state)."""

    def __init__(self, extractor: FeatureExtractor):
        c = extractor.cfg
        if c.framing != "zero_pad" or c.exact_pad:
            raise StreamingUnsupported(
                f"live transcription needs a model exported with NeMo >= 2.5 framing (zero_pad, exact_pad off); "
                f"this one has framing={c.framing}, exact_pad={c.exact_pad}"
            )
        self.fx = extractor
        self.hop, self.half = c.hop_length, c.n_fft // 2
        self._preemph = None if c.preemph is None else np.float32(c.preemph)
        self._last_x = np.float32(0.0)  # the sample before the next block (pre-emphasis)
        # Pre-emphasized samples from index _base; starts with the STFT's n_fft/2 zeros of padding.
        self._y = np.zeros(self.half, np.float32)
        self._base = -self.half
        self.samples = 0  # samples received
        self.frames = 0  # frames emitted

    def push(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Add samples; return the frames [n_mels, k] they complete."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            return np.zeros((self.fx.n_mels, 0), np.float32)
        if self._preemph is not None:
            y = np.empty_like(x)
            y[0] = x[0] - (self._preemph * self._last_x if self.samples else np.float32(0.0))
            y[1:] = x[1:] - self._preemph * x[:-1]
            self._last_x = x[-1]
        else:
            y = x
        self.samples += x.shape[0]
        self._y = np.concatenate([self._y, y])
        # Frame i is complete when samples up to i*hop + n_fft/2 are in; it is valid once L // hop > i.
        ready = min(self.samples // self.hop, (self.samples - self.half) // self.hop + 1)
        return self._emit(max(ready, self.frames))

    def finish(self) -> npt.NDArray[np.float32]:
        """The frames left at the end of the signal (their windows padded with zeros)."""
        self._y = np.concatenate([self._y, np.zeros(2 * self.half, np.float32)])
        return self._emit(max(self.samples // self.hop, self.frames))

    def _emit(self, upto: int) -> npt.NDArray[np.float32]:
        n = upto - self.frames
        if n <= 0:
            return np.zeros((self.fx.n_mels, 0), np.float32)
        start = self.frames * self.hop - self.half - self._base  # index in _y of frame `frames`'s first sample
        view = np.lib.stride_tricks.sliding_window_view(self._y[start:], 2 * self.half)[:: self.hop][:n]
        out = self.fx.frames_to_log_mel(view)
        self.frames = upto
        keep = self.frames * self.hop - self.half - self._base  # the next frame's first sample
        self._y, self._base = self._y[keep:], self._base + keep
        return out
