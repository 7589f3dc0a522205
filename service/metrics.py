"""Request counters behind ``/stats`` (JSON for people) and ``/metrics`` (Prometheus text).

One object records each request once; both endpoints read from it. Each app gets its own
Prometheus registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT = 10_000  # latencies kept for /stats percentiles: bounded memory, recent behaviour


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry()
        self._requests = PromCounter(
            "asr_requests",
            "Transcription requests by outcome and error code",
            ["outcome", "code"],
            registry=self.registry,
        )
        self._audio = PromCounter(
            "asr_audio_seconds", "Seconds of audio transcribed successfully", registry=self.registry
        )
        self._latency = Histogram(
            "asr_request_duration_seconds",
            "Time to answer a successful transcription",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._rtf = Histogram(
            "asr_real_time_factor",
            "Processing time divided by audio duration",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=self.registry,
        )
        self.ready = Gauge("asr_model_ready", "1 when the model is loaded and warmed up", registry=self.registry)
        self._lock = threading.Lock()
        self._outcomes: Counter[tuple[str, str]] = Counter()
        self._latencies: deque[float] = deque(maxlen=RECENT)
        self._audio_s = 0.0
        self._rtf_sum = 0.0
        self._ok = 0

    def success(self, latency_s: float, audio_s: float) -> None:
        rtf = latency_s / audio_s if audio_s > 0 else 0.0
        self._requests.labels("ok", "").inc()
        self._audio.inc(audio_s)
        self._latency.observe(latency_s)
        self._rtf.observe(rtf)
        with self._lock:
            self._outcomes["ok", ""] += 1
            self._latencies.append(latency_s)
            self._audio_s += audio_s
            self._rtf_sum += rtf
            self._ok += 1

    def failure(self, status: int, code: str) -> None:
        outcome = "client_error" if 400 <= status < 500 else ("unavailable" if status == 503 else "server_error")
        self._requests.labels(outcome, code).inc()
        with self._lock:
            self._outcomes[outcome, code] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = np.array(self._latencies) * 1000.0
            by_outcome: dict[str, Any] = {}
            for (outcome, code), n in sorted(self._outcomes.items()):
                if outcome == "ok":
                    by_outcome["ok"] = n
                else:
                    by_outcome.setdefault(outcome, {})[code] = n
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {"total": sum(self._outcomes.values()), **by_outcome},
                "audio_seconds": round(self._audio_s, 3),
                "latency_ms": {
                    f"p{q}": (round(float(np.percentile(lat, q)), 2) if lat.size else None) for q in (50, 95, 99)
                },
                "latency_window": int(lat.size),
                "mean_rtf": round(self._rtf_sum / self._ok, 5) if self._ok else None,
            }
