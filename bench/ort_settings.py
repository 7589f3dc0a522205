"""ONNX Runtime session settings, measured: graph optimization level and a saved optimized graph.

    .venv/bin/python -m bench.ort_settings [--repeats N]

On the ``stt_hi_conformer_ctc_medium``-shaped package (``bench.common``), for each graph
optimization level: the time to create the session (cold start; the median of 3) and the median
``run`` on 10 s of features, side by side in one process; then the same for a session that
loads the graph ``ORT_ENABLE_ALL`` optimized and saved (``optimized_model_filepath``), with
optimization off, which is what saving the optimized graph would buy a big model's start.
Then the CPU memory arena, on and off, through two real servers (``ASR_CPU_MEM_ARENA``): median
latency of 10 s and 20 s clips (round-robin), and each server's RSS at ready, after the requests
and after it has idled (its queue ran empty: ``malloc_trim``).
Writes ``bench/results/ort_settings.json``. ``service/engine.py`` records what it uses and why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.common import NAME, RESULTS, cpu_info, medium_model, speech
from service.config import available_cpus
from service.models import ModelPackage, Recognizer
from testkit.server import running_server

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def options(threads: int, level: ort.GraphOptimizationLevel, save: Path | None = None) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.graph_optimization_level = level
    if save is not None:
        o.optimized_model_filepath = str(save)
    return o


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    models, tokens = medium_model()
    pkg = ModelPackage.open(models, tokens, NAME)
    feats, lengths = Recognizer(pkg, "cpu", args.threads, 1).features.batch([speech(10.0, seed=10)])
    feed = {"audio_signal": feats, "length": lengths}
    out: dict[str, Any] = {"machine": cpu_info(), "threads": args.threads, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(
            str(pkg.onnx_path), options(args.threads, LEVELS["all"], saved), providers=["CPUExecutionProvider"]
        )
        variants = {name: (str(pkg.onnx_path), level) for name, level in LEVELS.items()}
        variants["saved all, loaded without optimizing"] = (str(saved), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sessions = {}
        for name, (path, level) in variants.items():
            starts = []
            for _ in range(3):
                t0 = time.perf_counter()
                sessions[name] = ort.InferenceSession(
                    path, options(args.threads, level), providers=["CPUExecutionProvider"]
                )
                starts.append(time.perf_counter() - t0)
            out["rows"][name] = {"session_create_ms": round(1000 * statistics.median(starts), 1)}
        for s in sessions.values():
            s.run(None, feed)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                time.sleep(0.1)
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["all"])
        for k, ts in times.items():
            med = statistics.median(ts)
            out["rows"][k].update({"run_10s_ms": round(1000 * med, 1), "run_vs_all": round(med / base, 3)})
            print(k, out["rows"][k], flush=True)
    out["arena"] = arena_ab(models, tokens, args.threads, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_settings.json").write_text(json.dumps(out, indent=1) + "\n")


def arena_ab(models: Path, tokens: Path, threads: int, repeats: int) -> dict[str, Any]:
    """The CPU memory arena on and off, each in its own real server, timed round-robin."""
    import httpx

    from bench.common import rss_mb, server_env, wav_bytes

    clips = {s: wav_bytes(speech(s, seed=s)) for s in (10, 20)}
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        servers = {}
        for arena in ("true", "false"):
            proc: list[Any] = []
            env = server_env(models, tokens, ASR_INTRA_OP_THREADS=str(threads), ASR_CPU_MEM_ARENA=arena)
            url = stack.enter_context(running_server(env, process=proc))
            servers[arena] = (url, proc[0].pid)
            out[arena] = {"rss_at_ready_mb": round(rss_mb(proc[0].pid))}
        client = stack.enter_context(httpx.Client(timeout=300))
        times: dict[tuple[str, int], list[float]] = {(a, s): [] for a in servers for s in clips}
        for _ in range(repeats + 1):
            for s, wav in clips.items():
                for a, (url, _) in servers.items():
                    time.sleep(0.1)
                    t0 = time.perf_counter()
                    client.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}).raise_for_status()
                    times[a, s].append(time.perf_counter() - t0)
        for a, (_, pid) in servers.items():
            out[a]["rss_after_requests_mb"] = round(rss_mb(pid))
        time.sleep(3)  # the queue ran empty: the scheduler hands freed heap back
        for a, (_, pid) in servers.items():
            out[a]["rss_idle_mb"] = round(rss_mb(pid))
            for s in clips:
                out[a][f"http_{s}s_ms"] = round(1000 * statistics.median(times[a, s][1:]), 1)  # first is warm-up
        for s in clips:
            out[f"off_vs_on_{s}s"] = round(out["false"][f"http_{s}s_ms"] / out["true"][f"http_{s}s_ms"], 3)
    print("arena", json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
