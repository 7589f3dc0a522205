"""Request and scheduler figures behind ``/stats`` (JSON for people) and ``/metrics`` (Prometheus).

One object records each event once; both endpoints read from it. Prometheus names follow the
Prometheus conventions (base units, ``_total`` counters, ``_seconds`` histograms) and carry a
``model`` label. Each app gets its own registry, so several apps in one process (tests) do not
collide; the registry also holds prometheus-client's process collector (RSS, CPU, open fds).
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client import Counter as PromCounter

from service.scheduler import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT = 10_000  # samples kept for /stats percentiles: bounded memory, recent behaviour


def _percentiles(values: deque[float]) -> dict[str, float | None]:
    a = np.array(values) * 1000.0
    return {f"p{q}": (round(float(np.percentile(a, q)), 2) if a.size else None) for q in (50, 95, 99)}


class _ModelFigures:
    """The /stats side of one model's figures (Prometheus keeps its own)."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency: deque[float] = deque(maxlen=RECENT)
        self.queue_wait: deque[float] = deque(maxlen=RECENT)
        self.compute: deque[float] = deque(maxlen=RECENT)
        self.audio_s = 0.0
        self.rtf_sum = 0.0
        self.ok = 0
        self.batches = 0
        self.batched_jobs = 0


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.process = ProcessCollector(registry=self.registry)
        r = self.registry
        self._requests = PromCounter(
            "asr_requests",
            "Transcription requests by model, outcome and error code",
            ["model", "outcome", "code"],
            registry=r,
        )
        self._audio = PromCounter("asr_audio_seconds", "Seconds of audio transcribed", ["model"], registry=r)
        self._latency = Histogram(
            "asr_request_duration_seconds",
            "Time from request received to transcript, successful requests",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "asr_queue_wait_seconds", "Time a job waited in the queue before its batch started", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._compute = Histogram(
            "asr_batch_compute_seconds", "Features + ONNX Runtime + decoding time of one batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_size = Histogram(
            "asr_batch_size", "Jobs per batch", ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r
        )
        self._rtf = Histogram(
            "asr_real_time_factor",
            "Request processing time divided by audio duration",
            ["model"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.ready = Gauge("asr_model_ready", "1 when the model is loaded and warmed up", ["model"], registry=r)
        self._queue_depth = Gauge("asr_queue_depth", "Jobs waiting for compute", ["model"], registry=r)
        self._in_progress = Gauge(
            "asr_requests_in_progress", "Admitted requests: uploading, queued or computing", ["model"], registry=r
        )
        # Live sessions (service.live): streams open, refusals, step and final latencies.
        self.streams_active = Gauge("asr_streams_active", "Live sessions open now", registry=r)
        self._streams = PromCounter(
            "asr_streams",
            "Live sessions by surface and outcome (ok, refused, error)",
            ["surface", "outcome"],
            registry=r,
        )
        self._step_wait = Histogram(
            "asr_stream_step_wait_seconds", "Time a live step waited for its batch, and ran", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._step_batch = Histogram(
            "asr_stream_step_batch_size",
            "Live steps per batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self._final = Histogram(
            "asr_stream_final_seconds", "Time from a live turn's end to its completed transcript", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.live: Counter[str] = Counter()
        self.step_wait: deque[float] = deque(maxlen=RECENT)
        self.final_latency: deque[float] = deque(maxlen=RECENT)
        self._lock = threading.Lock()
        self._models: dict[str, _ModelFigures] = {}

    def stream(self, surface: str, outcome: str) -> None:
        self._streams.labels(surface, outcome).inc()
        with self._lock:
            self.live[outcome] += 1

    def step_batch(self, model: str, steps: int, compute_s: float, wait_s: float) -> None:
        self._step_batch.labels(model).observe(steps)
        self._step_wait.labels(model).observe(wait_s)
        with self._lock:
            self.step_wait.append(wait_s)

    def final(self, model: str, latency_s: float) -> None:
        self._final.labels(model).observe(latency_s)
        with self._lock:
            self.final_latency.append(latency_s)

    def live_snapshot(self, active: int, capacity: int) -> dict[str, Any]:
        with self._lock:
            return {
                "active": active,
                "capacity": capacity,
                "sessions": dict(self.live),
                "step_wait_ms": _percentiles(self.step_wait),
                "final_ms": _percentiles(self.final_latency),
            }

    def _fig(self, model: str) -> _ModelFigures:
        if model not in self._models:
            self._models[model] = _ModelFigures()
        return self._models[model]

    def watch_queue(self, model: str, depth: Callable[[], int], in_progress: Callable[[], int]) -> None:
        """Gauges read the scheduler's live counts at scrape time."""
        self._queue_depth.labels(model).set_function(depth)
        self._in_progress.labels(model).set_function(in_progress)

    def success(self, model: str, latency_s: float, audio_s: float) -> None:
        rtf = latency_s / audio_s if audio_s > 0 else 0.0
        self._requests.labels(model, "ok", "").inc()
        self._audio.labels(model).inc(audio_s)
        self._latency.labels(model).observe(latency_s)
        self._rtf.labels(model).observe(rtf)
        with self._lock:
            f = self._fig(model)
            f.outcomes["ok", ""] += 1
            f.latency.append(latency_s)
            f.audio_s += audio_s
            f.rtf_sum += rtf
            f.ok += 1

    def failure(self, model: str, status: int, code: str) -> None:
        outcome = (
            "client_error"
            if 400 <= status < 500 and status != 499
            else {499: "client_gone", 503: "unavailable", 504: "timeout"}.get(status, "server_error")
        )
        self._requests.labels(model, outcome, code).inc()
        with self._lock:
            self._fig(model).outcomes[outcome, code] += 1

    def batch(self, model: str, b: BatchStats) -> None:
        self._compute.labels(model).observe(b.compute_s)
        self._batch_size.labels(model).observe(b.size)
        for w in b.queue_s:
            self._queue_wait.labels(model).observe(w)
        with self._lock:
            f = self._fig(model)
            f.compute.append(b.compute_s)
            f.queue_wait.extend(b.queue_s)
            f.batches += 1
            f.batched_jobs += b.size

    def rss_bytes(self) -> float | None:
        for fam in self.process.collect():
            if fam.name == "process_resident_memory_bytes":
                return float(fam.samples[0].value)
        return None  # not Linux

    def model_snapshot(self, model: str) -> dict[str, Any]:
        with self._lock:
            f = self._fig(model)
            by_outcome: dict[str, Any] = {}
            for (outcome, code), n in sorted(f.outcomes.items()):
                if outcome == "ok":
                    by_outcome["ok"] = n
                else:
                    by_outcome.setdefault(outcome, {})[code] = n
            return {
                "requests": {"total": sum(f.outcomes.values()), **by_outcome},
                "audio_seconds": round(f.audio_s, 3),
                "latency_ms": _percentiles(f.latency),
                "queue_wait_ms": _percentiles(f.queue_wait),
                "batch_compute_ms": _percentiles(f.compute),
                "batches": f.batches,
                "mean_batch_size": round(f.batched_jobs / f.batches, 3) if f.batches else None,
                "mean_rtf": round(f.rtf_sum / f.ok, 5) if f.ok else None,
                "window": len(f.latency),
            }

    def process_snapshot(self) -> dict[str, Any]:
        rss = self.rss_bytes()
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "rss_mb": round(rss / 2**20, 1) if rss is not None else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        }
