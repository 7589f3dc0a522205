"""Fair use, measured: does one client past its quota slow another down?

    .venv/bin/python -m bench.quotas [--seconds 20] [--hammer 16]

The real server with two API keys and the limits on (``ASR_QUOTA_REQUESTS_PER_MIN=60``,
``ASR_QUOTA_CONCURRENT=1``, ``ASR_QUOTA_AUDIO_S_PER_MIN=300``; medium-shaped model), then:
  1. bob alone: one 4 s clip at a time, for ``--seconds``: his latency p50/p95;
  2. bob again while alice runs ``--hammer`` clients that send the same clip back to back,
     waiting out each 429's Retry-After: bob's latency, alice's answers by status.
Then the same with alice ignoring Retry-After (an abusive or broken client; note that her 16
clients then run on the same 2 cores as the server), and with the limits off. Prints bob's latency ratio
(phase 2 / phase 1) for each; writes ``bench/results/quotas.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx

from bench.common import RESULTS, cpu_info, medium_model, server_env, speech, wav_bytes
from testkit.server import running_server

LIMITS = {"ASR_QUOTA_REQUESTS_PER_MIN": "60", "ASR_QUOTA_CONCURRENT": "1", "ASR_QUOTA_AUDIO_S_PER_MIN": "300"}


def latencies(url: str, key: str, wav: bytes, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = c.post(f"{url}/transcribe", files={"file": ("a.wav", wav)})
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"bob got {r.status_code}: {r.text}")
            time.sleep(0.8)  # ~1 request per second: within 60 per minute
    return out


def hammer(
    url: str, wav: bytes, clients: int, stop: threading.Event, statuses: Counter[int], obey: bool
) -> list[threading.Thread]:
    def run() -> None:
        with httpx.Client(timeout=120, headers={"Authorization": "Bearer alice"}) as c:
            while not stop.is_set():
                r = c.post(f"{url}/transcribe", files={"file": ("a.wav", wav)})
                statuses[r.status_code] += 1
                if obey and r.status_code == 429:
                    stop.wait(float(r.headers.get("Retry-After", "1")))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def phase(env: dict[str, str], wav: bytes, seconds: float, clients: int, obey: bool) -> dict[str, Any]:
    with running_server(env) as url:
        latencies(url, "bob", wav, 2)  # warm
        alone = latencies(url, "bob", wav, seconds)
        stop, statuses = threading.Event(), Counter[int]()
        threads = hammer(url, wav, clients, stop, statuses, obey)
        time.sleep(1)
        loaded = latencies(url, "bob", wav, seconds)
        stop.set()
        for t in threads:
            t.join(120)

    def summary(xs: list[float]) -> dict[str, float]:
        return {
            "n": len(xs),
            "p50_ms": round(1000 * statistics.median(xs), 1),
            "p95_ms": round(1000 * statistics.quantiles(xs, n=20)[-1], 1),
        }

    a, b = summary(alone), summary(loaded)
    return {
        "bob_alone": a,
        "bob_while_alice_hammers": b,
        "p50_ratio": round(b["p50_ms"] / a["p50_ms"], 2),
        "alice_statuses": dict(statuses),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--hammer", type=int, default=16)
    args = p.parse_args()
    models, tokens = medium_model()
    wav = wav_bytes(speech(4, seed=4))
    base = server_env(models, tokens, ASR_API_KEYS="alice,bob")
    out = {"machine": cpu_info(), "hammer_clients": args.hammer}
    runs = (
        ("limits_on, alice obeys Retry-After", {**base, **LIMITS}, True),
        ("limits_on, alice ignores Retry-After", {**base, **LIMITS}, False),
        ("limits_off", base, False),
    )
    for name, env, obey in runs:
        out[name] = phase(env, wav, args.seconds, args.hammer, obey)
        print(name, json.dumps(out[name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quotas.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
