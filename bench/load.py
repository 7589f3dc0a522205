"""Closed-loop load against the real server, started as users start it (``python -m service``).

    .venv/bin/python bench/load.py [--level-s 20] [--levels 1,2,4,...] [--overload-s 300]

1. Best offline throughput: the same clips through the in-process runtime, one by one and in
   length-sorted batches of 8 (audio seconds per second; the best of the two is the reference).
2. Sweep: at each concurrency c, c clients each send a clip, wait for the answer, send the next,
   for ``--level-s`` seconds. Latency p50/p95/p99, throughput (audio s/s, and as a fraction of
   the offline best), answers by status, the server's peak RSS.
3. Concurrency set-ups at c=16: batching on/off and 1 vs 2 inference workers, including an
   oversubscribed one (2 workers x 2 intra-op threads on 2 cores).
4. Overload: more clients than the queue admits, for ``--overload-s`` seconds. A refused client
   waits the Retry-After it is given, then tries again. Beside it, a sequential probe client in its
   own process measures answers apart from the load generator's own event-loop lag. 503 latency,
   served requests, server RSS sampled every second (first vs last minute).
Writes bench/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import NAME, RESULTS, cpu_info, medium_model, rss_mb, server_env, speech, wav_bytes
from service.config import Settings, available_cpus
from service.models import ModelPackage, Recognizer
from testkit.server import running_server

CLIP_S = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 3.5, 4.5, 6.5, 9.0, 2.5, 5.5, 11.0]


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


async def closed_loop(
    url: str, clips: list[tuple[bytes, float]], c: int, seconds: float, pid: int, honor_retry_after: bool = False
) -> dict[str, Any]:
    backoff_s = 1.0
    ok_lat: list[float] = []
    refused_lat: list[float] = []
    statuses: Counter[str] = Counter()
    audio = 0.0
    rss: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal audio
        k = i
        while time.perf_counter() < stop:
            data, dur = clips[k % len(clips)]
            k += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/transcribe", files={"file": ("a.wav", data)})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            dt = time.perf_counter() - t0
            statuses[status] += 1
            if status == "200":
                ok_lat.append(dt)
                audio += dur
            elif status == "503":
                refused_lat.append(dt)
                await asyncio.sleep(float(r.headers.get("retry-after", backoff_s)) if honor_retry_after else 0.0)

    async def sample_rss() -> None:
        while time.perf_counter() < stop:
            rss.append(rss_mb(pid))
            await asyncio.sleep(1.0)

    t_start = time.perf_counter()
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(sample_rss(), *(client(i, http) for i in range(c)))
    wall = time.perf_counter() - t_start
    return {
        "c": c,
        "requests": sum(statuses.values()),
        "status": dict(statuses),
        "p50_ms": pct(ok_lat, 50),
        "p95_ms": pct(ok_lat, 95),
        "p99_ms": pct(ok_lat, 99),
        "throughput_audio_s_per_s": round(audio / wall, 2),
        "refused_p50_ms": pct(refused_lat, 50),
        "refused_p99_ms": pct(refused_lat, 99),
        "peak_rss_mb": round(max(rss), 1) if rss else None,
        "rss_series_mb": [round(x, 1) for x in rss],
    }


def offline_throughput(models: Path, tokens: Path, clips: list[np.ndarray]) -> dict[str, float]:
    rec = Recognizer(ModelPackage.open(models, tokens, NAME), "cpu", available_cpus(), 1)
    for x in clips:  # warm: ONNX Runtime plans memory per input shape on first sight
        rec.transcribe([x])
    audio = sum(len(x) for x in clips) / 16000
    t0 = time.perf_counter()
    for x in clips:
        rec.transcribe([x])
    one = audio / (time.perf_counter() - t0)
    srt = sorted(clips, key=len)
    t0 = time.perf_counter()
    for i in range(0, len(srt), 8):
        rec.transcribe(srt[i : i + 8])
    batched = audio / (time.perf_counter() - t0)
    return {"one_by_one": round(one, 2), "batched_8": round(batched, 2), "best": round(max(one, batched), 2)}


def probe(url: str, data: bytes, seconds: float, out: Any) -> None:
    """A separate, sequential client (its own process): latency of each answer, by status.

    Tells the server's refusal time apart from the load generator's own event-loop lag.
    """
    lat: dict[str, list[float]] = {}
    stop = time.perf_counter() + seconds
    with httpx.Client(timeout=60) as http:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = http.post(f"{url}/transcribe", files={"file": ("a.wav", data)})
            lat.setdefault(str(r.status_code), []).append(time.perf_counter() - t0)
            time.sleep(0.1)
    out.put({k: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)} for k, v in lat.items()})


def run_level(
    env: dict[str, str],
    clips: list[tuple[bytes, float]],
    c: int,
    seconds: float,
    retry_after: bool = False,
    with_probe: bool = False,
) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    with running_server(env, process=procs) as url:
        # warm the server (first batches of each shape) before timing
        asyncio.run(closed_loop(url, clips, min(c, 4), 2.0, procs[0].pid))
        if not with_probe:
            return asyncio.run(closed_loop(url, clips, c, seconds, procs[0].pid, retry_after))
        import multiprocessing as mp

        q: Any = mp.get_context("spawn").Queue()
        pr = mp.get_context("spawn").Process(target=probe, args=(url, clips[0][0], seconds - 5, q))
        pr.start()
        result = asyncio.run(closed_loop(url, clips, c, seconds, procs[0].pid, retry_after))
        result["probe"] = q.get(timeout=120)
        pr.join()
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level-s", type=float, default=20.0)
    p.add_argument("--levels", default="1,2,4,8,16,32,64")
    p.add_argument("--overload-s", type=float, default=300.0)
    p.add_argument("--overload-c", type=int, default=0, help="clients in the overload run; 0 = 2 x queue size")
    p.add_argument("--skip-setups", action="store_true", help="skip the c=16 concurrency set-ups")
    args = p.parse_args()
    models, tokens = medium_model()
    raw = [speech(s, seed=i) for i, s in enumerate(CLIP_S)]
    clips = [(wav_bytes(x), len(x) / 16000) for x in raw]
    offline = offline_throughput(models, tokens, raw)
    print("offline throughput (audio s/s):", offline, flush=True)
    env = server_env(models, tokens)
    sweep = []
    for c in [int(x) for x in args.levels.split(",")]:
        r = run_level(env, clips, c, args.level_s)
        r["vs_offline_best"] = round(r["throughput_audio_s_per_s"] / offline["best"], 3)
        sweep.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "rss_series_mb"}), flush=True)
    setups = []
    if not args.skip_setups:
        n = available_cpus()
        for label, extra in [
            ("default: no batching, 1 worker x all CPUs", {}),
            ("batches <= 8 (ASR_MAX_BATCH_SIZE=8), 1 worker", {"ASR_MAX_BATCH_SIZE": "8"}),
            (f"2 workers x {max(1, n // 2)} threads", {"ASR_INFERENCE_WORKERS": "2"}),
            (
                f"2 workers x {n} threads (oversubscribed)",
                {"ASR_INFERENCE_WORKERS": "2", "ASR_INTRA_OP_THREADS": str(n)},
            ),
        ]:
            r = run_level({**env, **extra}, clips, 16, args.level_s)
            r["setup"] = label
            r["vs_offline_best"] = round(r["throughput_audio_s_per_s"] / offline["best"], 3)
            setups.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "rss_series_mb"}), flush=True)
    queue = Settings().queue_size
    oc = args.overload_c or 2 * queue
    over = run_level(env, clips, oc, args.overload_s, retry_after=True, with_probe=True)
    series = over["rss_series_mb"]
    minute = min(60, max(1, len(series) // 3))
    over["rss_first_minute_mb"] = round(statistics.mean(series[:minute]), 1)
    over["rss_last_minute_mb"] = round(statistics.mean(series[-minute:]), 1)
    over["rss_growth"] = round(over["rss_last_minute_mb"] / over["rss_first_minute_mb"] - 1, 4)
    print(json.dumps({k: v for k, v in over.items() if k != "rss_series_mb"}), flush=True)

    RESULTS.mkdir(exist_ok=True)
    out = {"machine": cpu_info(), "offline": offline, "sweep": sweep, "setups": setups, "overload": over}
    (RESULTS / "load.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        f"Machine: {out['machine']}. Model: stt_hi_conformer_ctc_medium shape (random weights). "
        f"Clips: {len(CLIP_S)} espeak-ng clips of 2-12 s. Server: `python -m service`, default settings "
        f"(queue {queue}, no batching). Best offline throughput: {offline['best']} audio s/s "
        f"(one by one {offline['one_by_one']}, batches of 8 {offline['batched_8']}).",
        "",
        "| c | requests | p50 ms | p95 ms | p99 ms | audio s/s | vs offline best | answers | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        md.append(
            f"| {r['c']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['throughput_audio_s_per_s']} | {r['vs_offline_best']} | {r['status']} | {r['peak_rss_mb']} |"
        )
    if setups:
        md += [
            "",
            "At c=16:",
            "",
            "| set-up | p50 ms | p99 ms | audio s/s | vs offline best |",
            "|---|---|---|---|---|",
        ]
        for r in setups:
            tput = r["throughput_audio_s_per_s"]
            md.append(f"| {r['setup']} | {r['p50_ms']} | {r['p99_ms']} | {tput} | {r['vs_offline_best']} |")
    o = over
    md += [
        "",
        f"Overload: {oc} clients for {args.overload_s:g} s against a queue of {queue}: answers {o['status']}; "
        f"served throughput {o['throughput_audio_s_per_s']} audio s/s; 503 latency p50 {o['refused_p50_ms']} ms, "
        f"p99 {o['refused_p99_ms']} ms; served p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms; server RSS first minute "
        f"{o['rss_first_minute_mb']} MB, last minute {o['rss_last_minute_mb']} MB ({o['rss_growth']:+.1%}). "
        f"A separate sequential probe client (own process, one request per 0.1 s) saw: {o['probe']}.",
    ]
    (RESULTS / "load.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
