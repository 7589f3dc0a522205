"""Cache-aware streaming (NeMo's cache-aware FastConformer), step for step as NeMo runs it.

A cache-aware model's encoder keeps attention and convolution caches between steps, so each
step costs only its new chunk. The exporter writes one graph per lookahead the model was trained
with (``model.json`` ``streaming``); a stream here carries its caches and cuts its features as
NeMo's ``CacheAwareStreamingAudioBuffer`` does with ``pad_and_drop_preencoded`` (the mode an
exported graph runs, and sherpa-onnx too):

* the features are the model's own (cache-aware models are trained unnormalized), as the whole
  signal would give them, computed as samples arrive; NeMo's buffer also holds the one frame past
  the signal's valid length (masked to ``pad_value``), and so does the stream at its end;
* each step's input is ``pre_encode_cache`` frames of earlier features (zeros before the first)
  and the next ``chunk_frames``; a last chunk shorter than the subsampling's frames is dropped;
* a step yields ``valid_out_len`` encoder frames, the last step all it has.

Steps of one stream are sequential (each needs the caches of the one before); steps of many
streams run together in one batch (``CacheAwareBatcher``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.features import FeatureExtractor
from service.live.buffered import Labels
from service.live.features import IncrementalLogMel
from service.package import StreamingGraph

SAMPLING_FRAMES = 8  # a later chunk shorter than this is not run (NeMo's get_sampling_frames()[1])


class CacheAwareGraph:
    """One exported streaming graph in ONNX Runtime."""

    def __init__(self, path: Path, spec: StreamingGraph, intra_op_threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.spec = spec
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self._int = {n: np.int32 if t == "tensor(int32)" else np.int64 for n, t in inputs.items() if "int" in t}

    def run(
        self,
        feats: npt.NDArray[np.float32],
        lengths: npt.NDArray[np.int64],
        caches: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        channel, time_, channel_len = caches
        out = self.session.run(
            None,
            {
                "audio_signal": feats,
                "length": lengths.astype(self._int.get("length", np.int64)),
                "cache_last_channel": channel,
                "cache_last_time": time_,
                "cache_last_channel_len": channel_len.astype(self._int.get("cache_last_channel_len", np.int64)),
            },
        )
        return out[0], np.asarray(out[1], np.int64), (out[2], out[3], np.asarray(out[4], np.int64))


@dataclass(eq=False)
class CacheAwareStream:
    """One stream of a cache-aware model: features, chunking, caches, and the greedy CTC result."""

    fx: FeatureExtractor
    spec: StreamingGraph
    blank_id: int
    mel: IncrementalLogMel = field(init=False)
    trailing_blanks: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        s = self.spec
        self.mel = IncrementalLogMel(self.fx)
        self._history = np.zeros((self.fx.n_mels, s.pre_encode_cache), np.float32)  # zeros before the first
        self._pending = np.zeros((self.fx.n_mels, 0), np.float32)
        self.caches = (
            np.zeros((1, *s.cache_last_channel), np.float32),
            np.zeros((1, *s.cache_last_time), np.float32),
            np.zeros((1,), np.int64),
        )
        self._ids: list[int] = []
        self._prev = blank_id = self.blank_id
        self.labels: list[int] = []  # every label, in order (tests compare NeMo's)
        self.steps = 0  # steps accepted
        self._emitted = 0  # step inputs handed out
        del blank_id

    @property
    def ids(self) -> list[int]:
        return self._ids

    def provisional_ids(self) -> list[int]:
        return []  # a cache-aware step's output is final: its lookahead is inside the step

    def push(self, samples: npt.NDArray[np.float32]) -> list[tuple[npt.NDArray[np.float32], bool]]:
        """Add samples; return the inputs of the steps they complete, in order (none is the last)."""
        return self._chunks(self.mel.push(samples), last=False)

    def finish(self) -> list[tuple[npt.NDArray[np.float32], bool]]:
        if self.finished:
            return []
        self.finished = True
        feats = self.mel.finish()
        pad = np.full((self.fx.n_mels, 1), self.fx.cfg.pad_value, np.float32)  # NeMo's masked extra frame
        return self._chunks(np.concatenate([feats, pad], axis=1), last=True)

    def _chunks(self, feats: npt.NDArray[np.float32], last: bool) -> list[tuple[npt.NDArray[np.float32], bool]]:
        n = self.spec.chunk_frames
        self._pending = np.concatenate([self._pending, feats], axis=1)
        out: list[tuple[npt.NDArray[np.float32], bool]] = []
        while self._pending.shape[1] >= n and not (last and self._pending.shape[1] == n):
            out.append(self._input(self._pending[:, :n], final=False))
            self._pending = self._pending[:, n:]
        if last and self._pending.shape[1] and (self._emitted == 0 or self._pending.shape[1] >= SAMPLING_FRAMES):
            out.append(self._input(self._pending, final=True))
            self._pending = self._pending[:, :0]
        return out

    def _input(self, chunk: npt.NDArray[np.float32], final: bool) -> tuple[npt.NDArray[np.float32], bool]:
        self._emitted += 1
        x = np.concatenate([self._history, chunk], axis=1)
        self._history = x[:, -self.spec.pre_encode_cache :] if self.spec.pre_encode_cache else self._history
        return x, final

    def accept(self, logprobs: npt.NDArray[np.float32], final: bool) -> Labels:
        """A step's log-probs [T, V+1] (its encoded length): keep ``valid_out_len`` frames
        (all of them on the last step), merge greedily; the labels kept."""
        if not final:
            logprobs = logprobs[: self.spec.valid_out_len]
        labels: Labels = np.asarray(logprobs.argmax(axis=-1), np.int64)
        for p in labels.tolist():
            if p != self.blank_id:
                if p != self._prev or self._prev == self.blank_id:
                    self._ids.append(p)
                self.trailing_blanks = 0
            else:
                self.trailing_blanks += 1
            self._prev = p
            self.labels.append(p)
        self.steps += 1
        return labels


def run_stream(
    graph: CacheAwareGraph, stream: CacheAwareStream, samples: npt.NDArray[np.float32], block: int = 1600
) -> list[int]:
    """Feed ``samples`` through ``stream`` in process, one step at a time (tools, tests)."""
    steps = []
    for i in range(0, samples.shape[0], block):
        steps += stream.push(samples[i : i + block])
        for x, final in steps:
            step(graph, stream, x, final)
        steps = []
    for x, final in stream.finish():
        step(graph, stream, x, final)
    return stream.ids


def step(
    graph: CacheAwareGraph, stream: CacheAwareStream, x: npt.NDArray[np.float32], final: bool
) -> npt.NDArray[np.float32]:
    lp, enc_len, caches = graph.run(x[None], np.array([x.shape[1]], np.int64), stream.caches)
    stream.caches = caches
    out = lp[0, : int(enc_len[0])]
    stream.accept(out, final)
    return out
