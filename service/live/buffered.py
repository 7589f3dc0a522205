"""Buffered CTC streaming for offline-trained models, step for step as NeMo's ``FrameBatchASR``.

NeMo's recipe (``speech_to_text_buffered_infer_ctc.py`` -> ``FrameBatchASR``): log-mel features
of the signal (not normalized) are cut into chunks of ``chunk_s``; each chunk enters a feature
buffer of ``buffer_s`` (initially filled, see below) that is normalized over itself (per mel
band, mean and population std + 1e-5) and run through the encoder. Of each step's output
frames, ``tokens_per_chunk`` frames ending ``delay`` frames before the buffer's end are kept;
greedy CTC over the kept frames of all steps is the transcript. At the end the signal is padded
with ``delay`` frames' worth of zeros, and the last, partial chunk is completed with zero
features. Each step of every stream has the same shape, so steps of many streams batch
without padding (``service.live.batcher``).

The initial fill: NeMo means the log-mel of silence (-16.635), but tests
``hasattr(asr_model.preprocessor, "log")``, which is false for its mel preprocessor, and so
fills with 0.0. ``fill=NEMO_FILL`` reproduces that (the parity test); the service fills with
silence (``SILENCE_FILL``), which is what NeMo meant and recognizes better.

The kept frames are final. The frames after them (the right context) are the *tail*: their
labels are provisional, shown as a partial and replaced by the next step.

``EncoderStream`` is the seam for models that carry encoder state between steps
(cache-aware FastConformer): a stream turns samples into step inputs and takes each step's
output labels back; the session does not care how.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.features import FeatureExtractor
from service.live.features import IncrementalLogMel

NEMO_FILL = 0.0  # what NeMo's FeatureFrameBufferer actually starts its buffer with (see above)
# What NeMo means to start with: the log-mel of digital silence. The service's default: measured on
# the default model, 24 held-out sentences, preset "fast": WER 15.8 % against 28.1 % with NeMo's 0.0.
SILENCE_FILL = -16.635
NORM_EPS = 1e-5  # FeatureFrameBufferer.normalize_frame_buffers' CONSTANT

Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Preset:
    """Latency against accuracy: how much audio a step adds, and how much the encoder hears."""

    name: str
    chunk_s: float  # audio each step adds (and the most a word waits for its step)
    buffer_s: float  # audio each step runs the encoder on: chunk plus equal left and right context
    description: str


# Picked by measurement (bench/streaming.py and README "Live transcription, measured"): on the
# default model, the stream's own WER on 24 held-out sentences was 14.0 % (fast), 14.9 %
# (balanced), 22.4 % (wide), against 16-22 % for the chunk/buffer pairs between them; offline 11.4 %.
# A model trained on shorter utterances hears short buffers better; "wide" (NeMo's script
# defaults) is for models trained on long ones.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fast", 0.32, 1.6, "words soonest; the most compute (5 encoder seconds per audio second)"),
        Preset("balanced", 0.8, 2.4, "the default: 3 encoder seconds per audio second"),
        Preset("wide", 1.6, 4.0, "NeMo's script defaults: the most context, the least compute, words latest"),
    )
}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class Geometry:
    """A preset in a model's frames, computed with NeMo's own formulas (float quirks included)."""

    chunk_s: float
    buffer_s: float
    feature_stride_s: float
    model_stride_s: float
    sample_rate: int

    @property
    def chunk_frames_f(self) -> float:  # AudioFeatureIterator._feature_frame_len
        return self.chunk_s / self.feature_stride_s

    @property
    def chunk_frames(self) -> int:  # FeatureFrameBufferer.n_frame_len
        return int(self.chunk_s / self.feature_stride_s)

    @property
    def buffer_frames(self) -> int:
        return int(self.buffer_s / self.feature_stride_s)

    @property
    def tokens_per_chunk(self) -> int:
        return math.ceil(self.chunk_s / self.model_stride_s)

    @property
    def delay(self) -> int:  # mid_delay in the NeMo script
        return math.ceil((self.chunk_s + (self.buffer_s - self.chunk_s) / 2) / self.model_stride_s)

    @property
    def pad_samples(self) -> int:  # FrameBatchASR.read_audio_file's end padding
        return int(self.delay * self.model_stride_s * self.sample_rate)

    @property
    def compute_ratio(self) -> float:
        """Encoder seconds run per second of audio (1.0 is offline recognition's)."""
        return self.buffer_s / self.chunk_s

    @classmethod
    def of(cls, preset: Preset, fx: FeatureExtractor, subsampling_factor: int) -> Geometry:
        c = fx.cfg
        stride = c.window_stride_s or c.hop_length / c.sample_rate
        g = cls(preset.chunk_s, preset.buffer_s, stride, stride * subsampling_factor, c.sample_rate)
        if g.chunk_frames < 1 or g.buffer_frames < g.chunk_frames:
            raise ValueError(
                f"preset {preset.name}: the buffer ({preset.buffer_s} s) must hold the chunk ({preset.chunk_s} s)"
            )
        return g


@dataclass
class GreedyMerge:
    """Greedy CTC collapse carried across steps (a label repeated over a step boundary is one
    token), and the run of blank frames at the end (the blank endpoint rule). Both streams use it."""

    blank: int
    ids: list[int] = field(default_factory=list)
    trailing_blanks: int = 0
    prev: int = -1  # the last label merged; -1: none yet (treated as a blank)

    def add(self, labels: list[int]) -> None:
        for p in labels:
            if p != self.blank:
                if p != self.prev or self.prev in (self.blank, -1):
                    self.ids.append(p)
                self.trailing_blanks = 0
            else:
                self.trailing_blanks += 1
            self.prev = p

    def peek(self, labels: list[int]) -> list[int]:
        """The tokens ``labels`` would add, without adding them (a provisional tail)."""
        trial = GreedyMerge(self.blank, [], 0, self.prev)
        trial.add(labels)
        return trial.ids


class EncoderStream(Protocol):
    """One turn's recognition state, as ``LiveSession`` sees it: samples in, step inputs out
    (run by the model's batcher, which hands each step's output back to the stream), the text.

    ``BufferedCtcStream`` (any CTC model, ``StepBatcher``) and
    ``service.live.cache_aware.CacheAwareStream`` (cache-aware models: the stream carries its
    encoder caches, ``CacheAwareBatcher`` stacks those of many streams) are the two kinds.
    """

    @property
    def trailing_blanks(self) -> int: ...  # kept frames since the last non-blank one (the blank endpoint rule)
    def push(self, samples: npt.NDArray[np.float32]) -> list[Any]: ...
    def finish(self) -> list[Any]: ...
    @property
    def ids(self) -> list[int]: ...
    def provisional_ids(self) -> list[int]: ...


class BufferedCtcStream:
    """``FrameBatchASR`` for one signal fed as it arrives. Bounded state: one feature buffer,
    one chunk of pending frames, the decoded token ids."""

    def __init__(
        self, fx: FeatureExtractor, geometry: Geometry, blank_id: int, fill: float = SILENCE_FILL, record: bool = False
    ):
        self.g, self.blank = geometry, blank_id
        self.kept: list[int] | None = [] if record else None  # every kept label (tests compare NeMo's)
        self.mel = IncrementalLogMel(fx)
        self._buffer = np.full((fx.n_mels, geometry.buffer_frames), fill, np.float32)
        self._pending = np.zeros((fx.n_mels, 0), np.float32)
        self._start = 0  # feature frames taken into chunks so far (the iterator's _start)
        self._merge = GreedyMerge(blank_id)
        self._tail: list[int] = []
        self.steps = 0  # steps accepted
        self.kept_frames = 0  # encoder frames kept (final) so far
        self.finished = False

    @property
    def ids(self) -> list[int]:
        return self._merge.ids

    @property
    def trailing_blanks(self) -> int:
        return self._merge.trailing_blanks

    def push(self, samples: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        """Add samples; return the normalized buffers of the steps they complete, in order."""
        return self._chunks(self.mel.push(samples))

    def finish(self) -> list[npt.NDArray[np.float32]]:
        """End of the signal: NeMo's end padding, then the last (zero-completed) chunk."""
        if self.finished:
            return []
        self.finished = True
        feats = np.concatenate([self.mel.push(np.zeros(self.g.pad_samples, np.float32)), self.mel.finish()], axis=1)
        out = self._chunks(feats)
        # AudioFeatureIterator always ends with one chunk of zeros holding what is left (maybe nothing).
        last = np.zeros((self._buffer.shape[0], int(self.g.chunk_frames_f)), np.float32)
        last[:, : self._pending.shape[1]] = self._pending
        self._pending = self._pending[:, :0]
        out.append(self._step(last))
        return out

    def _chunks(self, feats: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        self._pending = np.concatenate([self._pending, feats], axis=1) if self._pending.shape[1] else feats
        out: list[npt.NDArray[np.float32]] = []
        while True:
            n = int(self._start + self.g.chunk_frames_f) - self._start
            if self._pending.shape[1] < n:
                return out
            out.append(self._step(self._pending[:, :n]))
            self._pending = self._pending[:, n:]
            self._start += n

    def _step(self, chunk: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        k = chunk.shape[1]
        b = self._buffer
        b[:, :-k] = b[:, k:]
        b[:, -self.g.chunk_frames :] = chunk
        mean = np.mean(b, axis=1).reshape(-1, 1)
        std = np.std(b, axis=1).reshape(-1, 1)
        return np.asarray((b - mean) / (std + NORM_EPS), dtype=np.float32)

    def accept(self, labels: Labels) -> None:
        """The encoder's best label per frame for the next step (steps in order)."""
        decoded = labels.tolist()
        lo = len(decoded) - 1 - self.g.delay
        kept = decoded[lo : lo + self.g.tokens_per_chunk]  # NeMo's slice, negative start and all
        if self.kept is not None:
            self.kept += kept
        self._merge.add(kept)
        self.kept_frames += len(kept)
        self._tail = decoded[lo + self.g.tokens_per_chunk :] if lo + self.g.tokens_per_chunk > 0 else []
        self.steps += 1

    def provisional_ids(self) -> list[int]:
        """Tokens the last step's right context adds after the final ones (not yet final)."""
        return self._merge.peek(self._tail)


def transcribe_buffered(
    run: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
    stream: BufferedCtcStream,
    samples: npt.NDArray[np.float32],
    block: int = 1600,
) -> list[int]:
    """Feed ``samples`` in blocks through ``stream`` in process; ``run`` maps a batch of step
    buffers [B, n_mels, T] to log-probs [B, T', V+1]. The token ids (tools, tests, benches)."""
    for i in range(0, samples.shape[0], block):
        for buf in stream.push(samples[i : i + block]):
            stream.accept(run(buf[None])[0].argmax(-1))
    bufs = stream.finish()
    if bufs:
        for lp in run(np.stack(bufs)):
            stream.accept(lp.argmax(-1))
    return stream.ids
