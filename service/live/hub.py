"""What live sessions share in one app: admission, a step batcher per model, the model registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from service.config import Settings
from service.errors import ClientError
from service.live.batcher import StepBatcher
from service.live.buffered import PRESETS
from service.live.cache_aware import CacheAwareBatcher, pick_graph
from service.live.session import Emit, EndpointRules, LiveSession, StreamGate, TurnDetection
from service.metrics import Metrics
from service.models import Recognizer
from service.pipeline import Pipeline
from service.quotas import Quotas
from service.registry import ModelEntry, ModelRegistry

VAD_TURNS = TurnDetection()
T = TypeVar("T")


class LiveHub:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        pipeline: Pipeline,
        metrics: Metrics,
        quotas: Quotas | None = None,
    ):
        self.settings, self.registry, self.pipeline, self.metrics = settings, registry, pipeline, metrics
        self.quotas = quotas or Quotas()  # the HTTP routes' per-client buckets (service.quotas): shared
        self.gate = StreamGate(settings.stream_max)
        self._batchers: dict[str, StepBatcher | CacheAwareBatcher] = {}
        self._recognizers: dict[str, Recognizer] = {}
        metrics.streams_active.set_function(lambda: self.gate.active)
        self._stopping: set[asyncio.Task[None]] = set()
        # Set by the drain (service.drain) when live sessions must end: each finishes its turn in
        # progress, so its client gets that turn's final transcript, then closes (1012).
        self.finishing = asyncio.Event()
        registry.on_unload.append(self.forget)

    @property
    def active(self) -> int:
        """Live sessions open now, on every surface."""
        return self.gate.active

    def finish_all(self) -> None:
        self.finishing.set()

    async def unless_finishing(self, aw: Awaitable[T], timeout_s: float) -> T | None:
        """``aw``'s result (a client's next message); None once ``finishing`` is set, and
        ``TimeoutError`` after ``timeout_s``. ``aw`` is cancelled when it loses, so it must be
        safe to cancel (a queue's get, a WebSocket receive)."""
        if self.finishing.is_set():
            return None
        wanted = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.finishing.wait())
        try:
            done, _ = await asyncio.wait((wanted, stop), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not wanted.done():
                wanted.cancel()
        if wanted in done:
            return wanted.result()
        if stop in done:
            return None
        raise TimeoutError

    def forget(self, name: str) -> None:
        """A model unloaded: drop its step loop, or its recognizer (and graphs) would stay in memory."""
        b = self._batchers.pop(name, None)
        self._recognizers.pop(name, None)
        if b is not None:
            task = asyncio.ensure_future(b.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def admit(self, surface: str, client: str) -> None:
        """Take a session slot for ``client`` (a ``service.quotas`` key): ``ServiceUnavailable``
        when all are taken, a 429 ``ClientError`` past the client's quota; ``release`` gives it back."""
        try:
            if self.quotas.enabled:
                self.quotas.admit(client)
            try:
                self.gate.admit()
            except Exception:
                if self.quotas.enabled:
                    self.quotas.release(client, 0.0)
                raise
        except Exception:
            self.metrics.stream(surface, "refused")
            raise

    def release(self, client: str) -> None:
        self.gate.release()
        if self.quotas.enabled:
            self.quotas.release(client, 0.0)  # its audio was charged as it came (``Quotas.charge``)

    def batcher(self, entry: ModelEntry, rec: Recognizer) -> StepBatcher | CacheAwareBatcher:
        """The model's step loop: buffered steps, or a cache-aware model's (its streaming graphs load here)."""
        b = self._batchers.get(entry.name)
        if b is None or self._recognizers.get(entry.name) is not rec:  # first use, or the model was reloaded
            name = entry.name

            def stats(n: int, compute_s: float, wait_s: float) -> None:
                self.metrics.step_batch(name, n, compute_s, wait_s)

            streaming = rec.package.manifest.streaming
            if streaming is None:
                b = StepBatcher(rec, self.registry.pool, on_batch=stats)
            else:
                threads = self.settings.resolved_intra_op_threads()
                b = CacheAwareBatcher(rec.package.onnx_path.parent, threads, self.registry.pool, on_batch=stats)
            self._batchers[entry.name] = b
            self._recognizers[entry.name] = rec
        return b

    @asynccontextmanager
    async def session(
        self,
        entry: ModelEntry,
        emit: Emit,
        *,
        preset: str | None = None,
        turns: TurnDetection | None = VAD_TURNS,
        provisional: bool = False,
        lookahead_s: float | None = None,
    ) -> AsyncIterator[LiveSession]:
        """A live session on ``entry``'s model (loaded if needed, and kept loaded while it runs).

        A cache-aware model streams with its own graphs, at ``lookahead_s`` (one it was exported
        with; default: its default); ``preset`` is for buffered streaming of the other models.
        """
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
            streaming = rec.package.manifest.streaming
            spec = None
            if streaming is not None:
                try:
                    spec = pick_graph(streaming.graphs, streaming.default, lookahead_s)
                except ValueError as e:
                    raise ClientError(400, "invalid_lookahead", str(e), "lookahead") from None
            elif lookahead_s is not None:
                raise ClientError(
                    400,
                    "invalid_lookahead",
                    f"model '{entry.name}' is not a cache-aware streaming model: it takes a preset, not a lookahead",
                    "lookahead",
                )
            timeout = self.settings.request_timeout_s or 60.0

            async def offline_text(audio: npt.NDArray[np.float32]) -> str:
                out = await self.pipeline.transcribe_samples(entry, audio, timeout_s=timeout)
                return out.transcript.text

            s = LiveSession(
                rec,
                self.batcher(entry, rec),
                emit,
                offline_text,
                preset=PRESETS[preset or self.settings.stream_preset],
                turns=turns,
                rules=EndpointRules(
                    blank_end_s=self.settings.stream_endpoint_blank_s,
                    max_turn_s=min(self.settings.segment_max_s, rec.suited_max_s),
                ),
                final=self.settings.stream_final,
                provisional=provisional,
                on_final_latency=lambda s, name=entry.name: self.metrics.final(name, s),  # type: ignore[misc]
                cache_aware=spec,
            )
            yield s
        finally:
            self.registry.release(entry)

    async def stop(self) -> None:
        for b in self._batchers.values():
            await b.stop()
