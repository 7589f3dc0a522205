"""The models a server can serve: discovery, loading, a memory budget, least-recently-used unloading.

Every package in ``ASR_MODEL_DIR`` can be served. The default model and ``ASR_PRELOAD_MODELS``
load when the server starts (readiness waits for the default); any other loads on its first
request, which waits for it. Loaded models share the inference threads. Each load records
what it cost (resident memory before and after, at least the ONNX file's size); when loading
another would pass ``ASR_MODELS_MEMORY_MB``, the least recently used idle models are unloaded
first. A model serving a request is never unloaded; if the budget cannot be met, the request
gets 503 ``memory_budget`` naming the models in use.

Admission (``AdmissionGate``) is server-wide: ``ASR_QUEUE_SIZE`` requests at once, whatever the
model, because they share the cores and the memory; it is decided before the body is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.config import Settings
from service.engine import release_memory
from service.errors import ClientError, ServiceUnavailable
from service.metrics import Metrics
from service.models import ModelPackage, Recognizer
from service.package import Manifest, PackageError, list_packages
from service.scheduler import Scheduler

log = logging.getLogger("service")
Status = Literal["unloaded", "loading", "ready", "failed"]
DEFAULT_ALIAS = "default"


def default_model_name(settings: Settings) -> str:
    """``ASR_DEFAULT_MODEL``, else the first package in the models directory by name."""
    if settings.default_model:
        return settings.default_model
    names = list_packages(settings.model_dir)
    return names[0] if names else "(none)"


class AdmissionGate:
    """At most ``capacity`` requests in progress server-wide (queued or computing; uploads whose
    body is still arriving hold a slot of ``uploads`` instead, see ``service.middleware.Admission``)."""

    def __init__(self, capacity: int, retry_after_s: Callable[[], int]):
        self.capacity = max(1, capacity)
        self.admitted = 0
        self.max_admitted = 0
        self._retry_after_s = retry_after_s

    def check(self) -> None:
        """Raise the 503 ``admit`` would, without taking a slot."""
        if self.admitted >= self.capacity:
            raise ServiceUnavailable(
                "queue_full",
                f"server busy: {self.admitted} requests in progress (capacity {self.capacity}); retry later",
                self._retry_after_s(),
            )

    def admit(self) -> None:
        self.check()
        self.admitted += 1
        self.max_admitted = max(self.max_admitted, self.admitted)

    def release(self) -> None:
        self.admitted -= 1


@dataclass
class ModelEntry:
    name: str
    status: Status = "unloaded"
    reason: str = "not loaded yet: loads on first use"
    scheduler: Scheduler | None = None
    details: dict[str, Any] = field(default_factory=dict)
    language: str | None = None
    footprint_mb: float = 0.0  # measured at load; 0 = not yet known
    file_mb: float = 0.0
    active: int = 0  # requests using the model now
    last_used: float = 0.0
    loaded: asyncio.Future[None] | None = None


class ModelRegistry:
    """Every package the server can serve, by name, and what state each is in.

    Loads run on a thread of their own (``load_pool``), never on the inference pool: opening,
    checksumming and warming up model B must not delay requests to model A that is serving.
    """

    def __init__(self, settings: Settings, metrics: Metrics, infer_pool: Executor):
        self.settings, self.metrics, self.pool = settings, metrics, infer_pool
        self.load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-load")
        self.entries: dict[str, ModelEntry] = {}
        self._lock: asyncio.Lock | None = None
        self._stopping: set[asyncio.Future[None]] = set()
        self.on_unload: list[Callable[[str], None]] = []  # called with a model's name as it unloads
        self.refresh()
        names = list(self.entries)
        self.default = default_model_name(settings)
        if self.default not in self.entries:
            self.entries[self.default] = ModelEntry(self.default)  # fails to load, with a reason
        preload = [n.strip() for n in settings.preload_models if n.strip()]
        self.preload = [self.default] + [
            n for n in (names if preload == ["*"] else preload) if n != self.default and n in self.entries
        ]
        for n in preload:
            if n != "*" and n not in self.entries:
                log.warning("ASR_PRELOAD_MODELS names %s, which is not in %s", n, settings.model_dir)
        self.gate = AdmissionGate(settings.queue_size, self.retry_after_s)
        self.uploads = AdmissionGate(settings.uploads_max or 2 * settings.queue_size, self.retry_after_s)

    # -- discovery ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up packages added to the models directory since the last look."""
        for name in list_packages(self.settings.model_dir):
            if name not in self.entries:
                # Only model.json is read here: the package is opened (and its ONNX file
                # checksummed) once, when it loads; a broken package fails then, with its reason.
                entry = ModelEntry(name)
                pkg_dir = self.settings.model_dir / name
                try:
                    manifest = Manifest.read(pkg_dir)
                    entry.language = manifest.language
                    entry.file_mb = (pkg_dir / manifest.onnx.file).stat().st_size / 2**20
                except (OSError, PackageError):
                    pass
                self.entries[name] = entry

    def resolve(self, model: str | None, language: str | None) -> ModelEntry:
        """The entry a request asks for: by name, else by language, else the default model.

        ``default`` (unless a package has that name) means "no model named": a new user's first
        guess, and what OpenAI clients can send when they must name a model.
        """
        if model == DEFAULT_ALIAS and model not in self.entries:
            model = None
        if model:
            if model not in self.entries:
                self.refresh()
            if model not in self.entries:
                raise ClientError(
                    404,
                    "model_not_found",
                    f"model '{model}' is not served (available: {', '.join(self.entries)})",
                    "model",
                )
            return self.entries[model]
        if language:
            lang = language.lower().split("-")[0]
            default = self.entries[self.default]
            if default.language and default.language.lower().split("-")[0] == lang:
                return default
            for e in self.entries.values():
                if e.language and e.language.lower().split("-")[0] == lang:
                    return e
            have = sorted({e.language for e in self.entries.values() if e.language})
            raise ClientError(
                400,
                "unsupported_language",
                f"no model for language '{language}' (languages: {', '.join(have)})",
                "language",
            )
        return self.entries[self.default]

    # -- use ----------------------------------------------------------------------------------
    async def acquire(self, entry: ModelEntry) -> Scheduler:
        """Mark the model in use (loading it first if needed) and return its scheduler."""
        entry.active += 1
        try:
            if entry.status != "ready":
                if entry.name in self.preload and entry.status == "loading":
                    raise ServiceUnavailable("model_loading", f"model '{entry.name}' is loading; retry shortly", 2)
                await self.load(entry)
            if entry.status != "ready" or entry.scheduler is None:
                raise ServiceUnavailable("model_unavailable", f"model '{entry.name}' failed to load: {entry.reason}")
        except BaseException:
            entry.active -= 1
            raise
        entry.last_used = time.monotonic()
        return entry.scheduler

    def release(self, entry: ModelEntry) -> None:
        entry.active -= 1
        entry.last_used = time.monotonic()

    def retry_after_s(self) -> int:
        waits = [e.scheduler.retry_after_s() for e in self.entries.values() if e.scheduler is not None]
        return max(waits, default=1)

    # -- loading and unloading ----------------------------------------------------------------
    def _used_mb(self) -> float:
        return sum(e.footprint_mb for e in self.entries.values() if e.status == "ready")

    def _make_room(self, entry: ModelEntry) -> None:
        budget = self.settings.models_memory_mb
        if budget <= 0:
            return
        need = entry.footprint_mb or 3 * entry.file_mb
        idle = sorted(
            (e for e in self.entries.values() if e.status == "ready" and e.active == 0 and e is not entry),
            key=lambda e: e.last_used,
        )
        while self._used_mb() + need > budget and idle:
            self._unload(idle.pop(0), f"unloaded to make room for '{entry.name}' (ASR_MODELS_MEMORY_MB={budget:g})")
        if self._used_mb() + need > budget and self._used_mb() > 0:
            busy = [e.name for e in self.entries.values() if e.status == "ready"]
            raise ServiceUnavailable(
                "memory_budget",
                f"model '{entry.name}' needs about {need:.0f} MB; the {budget:g} MB budget is taken by models "
                f"in use ({', '.join(busy)}); retry later",
                5,
            )

    def _unload(self, entry: ModelEntry, why: str) -> None:
        sched = entry.scheduler
        entry.scheduler, entry.status, entry.reason, entry.loaded = None, "unloaded", why, None
        self.metrics.ready.labels(entry.name).set(0)
        if sched is not None:  # its queue is empty (the model was idle): stopping only ends its tasks
            task = asyncio.ensure_future(sched.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for hook in self.on_unload:  # others holding the model (live step loops) let go of it too
            hook(entry.name)
        log.info("model %s %s", entry.name, why)

    async def load(self, entry: ModelEntry) -> None:
        """Load ``entry`` (once, however many requests wait for it)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if entry.loaded is None:
            entry.loaded = asyncio.get_running_loop().create_future()
            entry.status, entry.reason = "loading", "model is loading"
            try:
                async with self._lock:  # one load at a time: memory measurements and budget stay honest
                    self._make_room(entry)
                    await self._load(entry)
            except ServiceUnavailable as e:
                entry.status, entry.reason, loaded = "unloaded", e.message, entry.loaded
                entry.loaded = None
                loaded.set_result(None)
                raise
            entry.loaded.set_result(None)
        await asyncio.shield(entry.loaded)

    async def _load(self, entry: ModelEntry) -> None:
        rss0 = self.metrics.rss_bytes() or 0.0
        rec = await asyncio.get_running_loop().run_in_executor(self.load_pool, self._build, entry)
        if rec is None:
            self.metrics.ready.labels(entry.name).set(0)
            return
        grown = ((self.metrics.rss_bytes() or 0.0) - rss0) / 2**20
        entry.footprint_mb = round(max(grown, entry.file_mb, entry.footprint_mb), 1)
        entry.details["memory_mb"] = entry.footprint_mb
        s = self.settings
        sched = Scheduler(
            rec,
            self.pool,
            max_batch_size=s.max_batch_size,
            max_queue_delay_ms=s.max_queue_delay_ms,
            workers=s.inference_workers,
            on_batch=lambda b, name=entry.name: self.metrics.batch(name, b),  # type: ignore[misc]
        )
        sched.start()
        self.metrics.watch_queue(entry.name, lambda: sched.queued, lambda: entry.active)
        entry.scheduler, entry.status, entry.reason = sched, "ready", "ok"
        entry.last_used = time.monotonic()
        self.metrics.ready.labels(entry.name).set(1)

    def _build(self, entry: ModelEntry) -> Recognizer | None:
        """Open the package, build the recognizer, run a warm-up inference (in the executor)."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            pkg = ModelPackage.open(s.model_dir, s.tokens_dir, entry.name)
            rec = Recognizer(pkg, s.device, s.resolved_intra_op_threads(), s.inter_op_threads, s.cpu_mem_arena)
            t1 = time.perf_counter()
            # Warm-up: the first run allocates buffers and picks kernels; do it before saying ready.
            rec.transcribe([np.zeros(rec.sample_rate, dtype=np.float32)])
            # Loading copies and rewrites the graph's weights (fusions, prepacking); what it freed stays
            # in this thread's malloc arena unless handed back (bench/big_model.py: RSS at ready).
            release_memory()
        except Exception as e:  # any failure (bad package, ORT refusing the graph) must become a 503 reason
            entry.status = "failed"
            entry.reason = str(e) if isinstance(e, PackageError) else f"{type(e).__name__}: {e}"
            log.error("model %s failed to load: %s", entry.name, entry.reason)
            return None
        t2 = time.perf_counter()
        entry.language = pkg.manifest.language
        entry.details = {
            **pkg.summary(),
            "providers": rec.engine.providers,
            "intra_op_threads": rec.engine.intra_op_threads,
            "inter_op_threads": rec.engine.inter_op_threads,
            "load_s": round(t2 - t0, 3),
            "warmup_ms": round((t2 - t1) * 1000, 1),
        }
        log.info("model %s loaded in %.2f s (providers %s)", entry.name, t2 - t0, rec.engine.providers)
        return rec

    async def start(self) -> None:
        """Load the default model and the preload list, in that order."""
        for name in self.preload:
            entry = self.entries[name]
            if entry.status == "failed":
                self.metrics.ready.labels(name).set(0)
                continue
            try:
                await self.load(entry)
            except ServiceUnavailable as e:
                log.error("model %s not preloaded: %s", name, e.message)

    async def stop(self) -> None:
        for e in self.entries.values():
            if e.scheduler is not None:
                await e.scheduler.stop()
        self.load_pool.shutdown(wait=True, cancel_futures=True)
