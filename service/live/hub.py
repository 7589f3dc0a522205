"""What live sessions share in one app: admission, a step batcher per model, the model registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import numpy.typing as npt

from service.config import Settings
from service.live.batcher import StepBatcher
from service.live.buffered import PRESETS
from service.live.session import Emit, EndpointRules, LiveSession, StreamGate, TurnDetection
from service.metrics import Metrics
from service.models import Recognizer
from service.pipeline import Pipeline
from service.registry import ModelEntry, ModelRegistry

VAD_TURNS = TurnDetection()


class LiveHub:
    def __init__(self, settings: Settings, registry: ModelRegistry, pipeline: Pipeline, metrics: Metrics):
        self.settings, self.registry, self.pipeline, self.metrics = settings, registry, pipeline, metrics
        self.gate = StreamGate(settings.stream_max)
        self._batchers: dict[str, StepBatcher] = {}
        metrics.streams_active.set_function(lambda: self.gate.active)

    def admit(self, surface: str) -> None:
        """Take a session slot (``ServiceUnavailable`` when all are taken); ``release`` gives it back."""
        try:
            self.gate.admit()
        except Exception:
            self.metrics.stream(surface, "refused")
            raise

    def release(self) -> None:
        self.gate.release()

    def batcher(self, entry: ModelEntry, rec: Recognizer) -> StepBatcher:
        b = self._batchers.get(entry.name)
        if b is None or b.recognizer is not rec:  # first use, or the model was unloaded and reloaded
            b = StepBatcher(
                rec,
                self.registry.pool,
                on_batch=lambda n, c, w, name=entry.name: self.metrics.step_batch(name, n, c, w),  # type: ignore[misc]
            )
            self._batchers[entry.name] = b
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
    ) -> AsyncIterator[LiveSession]:
        """A live session on ``entry``'s model (loaded if needed, and kept loaded while it runs)."""
        sched = await self.registry.acquire(entry)
        try:
            rec = sched.recognizer
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
            )
            yield s
        finally:
            self.registry.release(entry)

    async def stop(self) -> None:
        for b in self._batchers.values():
            await b.stop()
