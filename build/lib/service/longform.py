"""Long recordings: overlapping windows, merged at the frame level.

A recording longer than one window (``ChunkPlan.single_max``) is cut into *cores* of
``chunk_s`` seconds; each core runs through the encoder inside a window that adds
``context_s`` seconds of audio on both sides (NeMo's buffered CTC inference works the same
way), and only the core's encoder frames are kept. The kept frames of consecutive cores
abut exactly, so the merged best path is one continuous frame sequence: greedy CTC over it
collapses a token that straddles a boundary into one, and no word is lost or doubled.
Word timings come out in the recording's own frame numbers.

Features are normalized with statistics of the whole recording (``scan`` gathers them in a
first, log-mel-only pass), as NeMo normalizes an unchunked input. Memory stays bounded by the
window size: the decoder reads the file block by block, twice, and only 8 bytes per encoder
frame of the result are kept (``FramePath``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.decoding import FramePath
from service.features import FeatureExtractor, NormStats


@dataclass(frozen=True)
class ChunkPlan:
    core: int  # samples per core, a multiple of the encoder frame's samples
    context: int  # samples of context on each side, likewise
    frame_samples: int

    @classmethod
    def create(
        cls, chunk_s: float, context_s: float, sample_rate: int, frame_samples: int, max_window_s: float = math.inf
    ) -> ChunkPlan:
        """Round to whole encoder frames; shrink to fit a model whose window is limited."""
        if math.isfinite(max_window_s) and chunk_s + 2 * context_s > max_window_s:
            scale = max_window_s / (chunk_s + 2 * context_s)
            chunk_s, context_s = chunk_s * scale, context_s * scale
        core = max(1, int(chunk_s * sample_rate) // frame_samples) * frame_samples
        context = int(context_s * sample_rate) // frame_samples * frame_samples
        return cls(core, context, frame_samples)

    @property
    def single_max(self) -> int:
        """Longest input (samples) that runs as one piece, unchunked."""
        return self.core + 2 * self.context


@dataclass(frozen=True)
class Scan:
    """First pass over a recording: the samples themselves if short, else normalization stats."""

    n_samples: int
    samples: npt.NDArray[np.float32] | None
    stats: NormStats | None


def scan(blocks: Iterator[npt.NDArray[np.float32]], plan: ChunkPlan, features: FeatureExtractor) -> Scan:
    """Read a recording once: keep it whole if it fits one window, else gather its feature statistics."""
    kept: list[npt.NDArray[np.float32]] = []
    n = 0
    stats: NormStats | None = None
    pending = np.zeros(0, np.float32)
    for b in blocks:
        n += b.shape[0]
        if stats is None:
            kept.append(b)
            if n <= plan.single_max:
                continue
            stats = NormStats(features.cfg.normalize, features.n_mels)
            pending = np.concatenate(kept)
            kept = []
        else:
            pending = np.concatenate([pending, b])
        while pending.shape[0] >= plan.core:  # whole cores, in order
            stats.add(features.log_mel(pending[: plan.core]))
            pending = pending[plan.core :]
    if stats is None:
        return Scan(n, kept[0] if len(kept) == 1 else np.concatenate(kept), None)
    if pending.shape[0] >= features.min_samples():
        stats.add(features.log_mel(pending))
    return Scan(n, None, stats)


@dataclass(frozen=True)
class Window:
    samples: npt.NDArray[np.float32]
    keep_from: int  # encoder frames of this window's output that belong to its core
    keep_to: int | None  # None: to the end (the last window)

    def keep(self, path: FramePath) -> FramePath:
        """The frames of this window's output that belong to its core."""
        return path.slice(self.keep_from, len(path) if self.keep_to is None else self.keep_to)


def windows(blocks: Iterator[npt.NDArray[np.float32]], plan: ChunkPlan) -> Iterator[Window]:
    """Overlapping windows over a recording read block by block; holds at most a window plus a block."""
    core, ctx, f = plan.core, plan.context, plan.frame_samples
    buf = np.zeros(0, np.float32)
    buf_start = 0  # recording sample index of buf[0]
    eof = False
    k = 0
    while True:
        core_start = k * core
        ws, we = max(0, core_start - ctx), core_start + core + ctx
        while not eof and buf_start + buf.shape[0] < we:
            try:
                buf = np.concatenate([buf, next(blocks)])
            except StopIteration:
                eof = True
        end = buf_start + buf.shape[0]
        if core_start >= end and k > 0:
            return
        last = eof and end <= core_start + core
        yield Window(
            buf[ws - buf_start : min(we, end) - buf_start],
            (core_start - ws) // f,
            None if last else (core_start + core - ws) // f,
        )
        if last:
            return
        k += 1
        drop = max(0, (k * core - ctx) - buf_start)
        buf, buf_start = buf[drop:], buf_start + drop
