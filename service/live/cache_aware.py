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

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.features import FeatureExtractor
from service.live.buffered import GreedyMerge, Labels
from service.live.features import IncrementalLogMel
from service.package import PackageError, StreamingGraph, sha256_file

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
        self._merge = GreedyMerge(self.blank_id)
        self.labels: list[int] = []  # every label, in order (tests compare NeMo's)
        self.steps = 0  # steps accepted
        self._emitted = 0  # step inputs handed out

    @property
    def ids(self) -> list[int]:
        return self._merge.ids

    @property
    def trailing_blanks(self) -> int:
        return self._merge.trailing_blanks

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
        self._merge.add(labels.tolist())
        self.labels += labels.tolist()
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


@dataclass(eq=False)
class _Job:
    graph: CacheAwareGraph
    x: npt.NDArray[np.float32]
    caches: tuple[np.ndarray, np.ndarray, np.ndarray]
    future: asyncio.Future[tuple[npt.NDArray[np.float32], tuple[np.ndarray, np.ndarray, np.ndarray]]]
    enqueued: float


class CacheAwareBatcher:
    """One decode loop per cache-aware model: the due steps of all its streams (same lookahead,
    same input length) stacked with their caches into one run."""

    MAX_STEPS = 64

    def __init__(
        self,
        pkg_dir: Path,
        threads: int,
        executor: Executor,
        on_batch: Callable[[int, float, float], None] | None = None,
    ):
        self.pkg_dir, self.threads, self.executor, self.on_batch = pkg_dir, threads, executor, on_batch
        self.graphs: dict[str, CacheAwareGraph] = {}  # loaded on first use: each holds the model's weights
        self._queue: list[_Job] = []
        self._wake = asyncio.Event()
        self._loading = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def graph(self, spec: StreamingGraph) -> CacheAwareGraph:
        if spec.file not in self.graphs:
            path = self.pkg_dir / spec.file
            if spec.sha256 and sha256_file(path) != spec.sha256:
                raise PackageError(f"{path}: checksum differs from model.json (corrupt or replaced file)")
            self.graphs[spec.file] = CacheAwareGraph(path, spec, self.threads)
        return self.graphs[spec.file]

    async def run(self, stream: CacheAwareStream, steps: list[tuple[npt.NDArray[np.float32], bool]]) -> None:
        """Run a stream's steps in order (each needs the caches the one before leaves)."""
        graph = self.graphs.get(stream.spec.file)
        if graph is None:  # checksum and session creation take seconds: never on the event loop
            async with self._loading:
                graph = await asyncio.get_running_loop().run_in_executor(None, self.graph, stream.spec)
        for x, final in steps:
            if self._task is None:
                self._task = asyncio.create_task(self._loop(), name="live-cache-aware-steps")
            job = _Job(graph, x, stream.caches, asyncio.get_running_loop().create_future(), time.monotonic())
            self._queue.append(job)
            self._wake.set()
            try:
                lp, stream.caches = await job.future
            finally:
                if not job.future.done():
                    job.future.cancel()
            stream.accept(lp, final)

    def _run(
        self, batch: list[_Job]
    ) -> list[tuple[npt.NDArray[np.float32], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        x = np.stack([j.x for j in batch])
        caches = tuple(np.concatenate([j.caches[i] for j in batch]) for i in range(3))
        lp, enc_len, nxt = batch[0].graph.run(x, np.full(len(batch), x.shape[2], np.int64), caches)  # type: ignore[arg-type]
        return [
            (lp[b, : int(enc_len[b])], (nxt[0][b : b + 1], nxt[1][b : b + 1], nxt[2][b : b + 1]))
            for b in range(len(batch))
        ]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._queue = [j for j in self._queue if not j.future.done()]
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._queue[0]
            batch = [j for j in self._queue if j.graph is first.graph and j.x.shape == first.x.shape][: self.MAX_STEPS]
            taken = set(map(id, batch))
            self._queue = [j for j in self._queue if id(j) not in taken]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as e:  # an ORT failure fails these steps' streams, not the loop
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            now = time.monotonic()
            for j, r in zip(batch, results, strict=True):
                if not j.future.done():
                    j.future.set_result(r)
            if self.on_batch:
                self.on_batch(len(batch), time.perf_counter() - t0, max(now - j.enqueued for j in batch))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for j in self._queue:
            if not j.future.done():
                j.future.cancel()
        self._queue.clear()


def pick_graph(specs: list[StreamingGraph], default: int, lookahead_s: float | None) -> StreamingGraph:
    """The graph a session asks for by lookahead (seconds), else the package's default."""
    if lookahead_s is None:
        return specs[default]
    for s in specs:
        if abs(s.lookahead_s - lookahead_s) < 1e-6:
            return s
    have = ", ".join(f"{s.lookahead_s:g}" for s in specs)
    raise ValueError(f"lookahead {lookahead_s:g} s is not one of this model's ({have} s)")
