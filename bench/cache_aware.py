"""Cache-aware streaming, measured: a model of the shape of NVIDIA's
``stt_en_fastconformer_hybrid_large_streaming_multi`` (FastConformer, d_model 512, 17 layers,
x8, lookaheads 0 / 80 / 480 / 1040 ms; random weights: speed depends on shape, not weights).

    .venv/bin/python -m bench.cache_aware [--seconds 60] [--capacity-s 45] [--levels 2,4,8]

1. Compute per second of audio, in process, one stream, the service's threads: each lookahead
   (``service.live.cache_aware``), the buffered presets over the offline graph
   (``service.live.buffered``), the offline graph on the same audio in 20 s pieces (how an
   upload is recognized), and sherpa-onnx's online NeMo CTC recognizer on the same graphs.
2. Capacity, real server, real-time-paced Realtime clients (continuous speech, server VAD,
   finals from the stream): at each client count, the server's step wait p95 and the end of
   speech -> final p95 in the first and last third (flat: last <= 1.5 x first + 0.2 s), for the
   default lookahead (1.04 s), the smallest one (0 s), and the same model served by buffered
   streaming (preset balanced) from a copy of the package without its streaming graphs.
Builds the model into .cache/bench on first use (NeMo, ~3 min). Writes bench/results/cache_aware.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CACHE, RESULTS, cpu_info, server_env, speech
from bench.streaming import capacity_run, heldout, keeps_up
from service.config import available_cpus
from service.live.buffered import PRESETS, BufferedCtcStream, Geometry, transcribe_buffered
from service.live.cache_aware import CacheAwareGraph, CacheAwareStream, run_stream
from service.models import ModelPackage, Recognizer
from service.package import MANIFEST_FILE
from testkit.nemo import EXPORT_PYTHON, ROOT
from testkit.server import running_server

NAME = "bench_streaming_large"


def large_model() -> tuple[Path, Path]:
    models, tokens = CACHE / "models", CACHE / "tokens"
    if (models / NAME / MANIFEST_FILE).exists():
        return models, tokens
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    nemo = CACHE / "streaming_large_nemo"
    subprocess.run(
        [str(EXPORT_PYTHON), "tests/nemo_side/build_model.py", "--out", str(nemo), "--arch", "streaming_large",
         "--vocab-size", "128"], check=True, cwd=ROOT, env=env,
    )  # fmt: skip
    subprocess.run(
        [str(EXPORT_PYTHON), "export_to_onnx.py", str(nemo / "model.nemo"), "--name", NAME, "--language", "en",
         "--models-dir", str(models), "--tokens-dir", str(tokens), "--max-audio-s", "300"],
        check=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return models, tokens


def buffered_copy(models: Path) -> str:
    """The same package without its streaming graphs: the service streams it buffered."""
    name = NAME + "_buffered"
    dst = models / name
    if not (dst / MANIFEST_FILE).exists():
        dst.mkdir(exist_ok=True)
        for f in ("model.onnx",):
            if not (dst / f).exists():
                os.link(models / NAME / f, dst / f)
        m = json.loads((models / NAME / MANIFEST_FILE).read_text())
        m.pop("streaming")
        m["name"] = name
        (dst / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    return name


def compute(models: Path, tokens: Path, audio: np.ndarray) -> dict[str, Any]:
    threads = available_cpus()
    rec = Recognizer(ModelPackage.open(models, tokens, NAME), intra_op_threads=threads)
    spec_all = rec.package.manifest.streaming
    assert spec_all is not None
    dur = audio.shape[0] / 16000
    out: dict[str, Any] = {"audio_s": round(dur, 1), "threads": threads}
    t0 = time.perf_counter()
    for i in range(0, audio.shape[0], 20 * 16000):
        rec.transcribe([audio[i : i + 20 * 16000]])
    out["offline"] = round((time.perf_counter() - t0) / dur, 4)
    pkg = models / NAME
    for spec in spec_all.graphs:
        g = CacheAwareGraph(pkg / spec.file, spec, threads)
        run_stream(g, CacheAwareStream(rec.features, spec, rec.blank_id), audio[: 16000 * 2])  # warm up
        t0 = time.perf_counter()
        run_stream(g, CacheAwareStream(rec.features, spec, rec.blank_id), audio)
        out[f"cache_aware_{spec.lookahead_s:g}s"] = round((time.perf_counter() - t0) / dur, 4)

    # Eight streams in one batch per step, as the server runs concurrent sessions: per stream.
    spec = spec_all.graphs[spec_all.default]
    g = CacheAwareGraph(pkg / spec.file, spec, threads)
    streams = [CacheAwareStream(rec.features, spec, rec.blank_id) for _ in range(8)]
    t0 = time.perf_counter()
    for i in range(0, audio.shape[0] + 1, 1600):
        fin = i >= audio.shape[0]
        steps = [s.finish() if fin else s.push(audio[i : i + 1600]) for s in streams]
        for k in range(len(steps[0])):
            x = np.stack([st[k][0] for st in steps])
            caches = tuple(np.concatenate([s.caches[j] for s in streams]) for j in range(3))
            lp, n, nxt = g.run(x, np.full(8, x.shape[2], np.int64), caches)  # type: ignore[arg-type]
            for b, s in enumerate(streams):
                s.caches = (nxt[0][b : b + 1], nxt[1][b : b + 1], nxt[2][b : b + 1])
                s.accept(lp[b, : int(n[b])], steps[b][k][1])
    out[f"cache_aware_{spec.lookahead_s:g}s_8_streams_batched_per_stream"] = round(
        (time.perf_counter() - t0) / dur / 8, 4
    )

    def run(b: np.ndarray) -> np.ndarray:
        return rec.engine.run(b, np.full(b.shape[0], b.shape[2], np.int64))

    for name, p in PRESETS.items():
        geo = Geometry.of(p, rec.features, rec.subsampling.factor)
        t0 = time.perf_counter()
        transcribe_buffered(run, BufferedCtcStream(rec.features, geo, rec.blank_id), audio)
        out[f"buffered_{name}"] = round((time.perf_counter() - t0) / dur, 4)
    try:
        import sherpa_onnx

        tok = tokens / rec.package.manifest.vocabulary.tokens_file
        for spec in spec_all.graphs:
            r = sherpa_onnx.OnlineRecognizer.from_nemo_ctc(
                model=str(pkg / spec.file), tokens=str(tok), num_threads=threads
            )
            s = r.create_stream()
            t0 = time.perf_counter()
            for i in range(0, audio.shape[0], 1600):
                s.accept_waveform(16000, audio[i : i + 1600])
                while r.is_ready(s):
                    r.decode_stream(s)
            s.input_finished()
            while r.is_ready(s):
                r.decode_stream(s)
            out[f"sherpa_onnx_{spec.lookahead_s:g}s"] = round((time.perf_counter() - t0) / dur, 4)
    except Exception as e:  # report, do not hide: the table says what failed
        out["sherpa_onnx_error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--capacity-s", type=float, default=45.0)
    p.add_argument("--levels", default="2,4,8")
    p.add_argument("--setups", default="1.04,0,buffered", help="which of: 1.04 (lookahead), 0, buffered")
    p.add_argument("--append", action="store_true", help="add the capacity rows to the last run's")
    args = p.parse_args()
    models, tokens = large_model()
    audio = speech(args.seconds)
    out: dict[str, Any] = {"machine": cpu_info(), "compute": compute(models, tokens, audio), "capacity": []}
    print(json.dumps(out["compute"]), flush=True)
    if not args.levels:  # compute only: keep the capacity figures of the last full run
        prev = RESULTS / "cache_aware.json"
        out["capacity"] = json.loads(prev.read_text())["capacity"] if prev.exists() else []
        for r in out["capacity"]:  # the criterion as it is now, on the recorded figures
            r["flat"] = keeps_up(r["final_p95_first_third_s"], r["final_p95_last_third_s"])
        (RESULTS / "cache_aware.json").write_text(json.dumps(out, indent=1) + "\n")
        (RESULTS / "cache_aware.md").write_text(markdown(out) + "\n")
        print(markdown(out))
        return
    clips = heldout()
    buffered = buffered_copy(models)
    base = {**server_env(models, tokens), "ASR_STREAM_FINAL": "stream", "ASR_STREAM_MAX": "64"}
    # Random weights: their words are noise, so each turn's reference is the sentence's own end.
    meta = [{"ref": t, "word_ends": [x.shape[0] / 16000]} for x, t in clips]
    if args.append and (RESULTS / "cache_aware.json").exists():
        out["capacity"] = json.loads((RESULTS / "cache_aware.json").read_text())["capacity"]
    setups = {
        "1.04": ("cache-aware, lookahead 1.04 s", NAME, {}),
        "0": ("cache-aware, lookahead 0 s", NAME, {"lookahead": "0"}),
        "buffered": ("buffered, preset balanced", buffered, {}),
    }
    for label, model, extra in (setups[k] for k in args.setups.split(",")):
        procs: list[subprocess.Popen[str]] = []
        with running_server({**base, "ASR_DEFAULT_MODEL": model}, process=procs) as url:
            for n in [int(v) for v in args.levels.split(",") if v]:
                r = asyncio.run(capacity_run(url, clips, meta, n, args.capacity_s, procs[0].pid, "balanced", extra))
                r["setup"] = label
                out["capacity"].append(r)
                print(json.dumps(r), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_aware.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "cache_aware.md").write_text(markdown(out) + "\n")
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    c = out["compute"]
    md = [
        f"Machine: {out['machine']}. Model: stt_en_fastconformer_hybrid_large_streaming_multi shape (random weights), "
        f"{c['audio_s']} s of speech, {c['threads']} threads. Compute seconds per second of audio (lower is better):",
        "",
        "| how | compute s per audio s | vs offline |",
        "|---|---|---|",
    ]
    for k, v in c.items():
        if k in ("audio_s", "threads") or not isinstance(v, float):
            continue
        md.append(f"| {k.replace('_', ' ')} | {v} | {v / c['offline']:.2f}x |")
    if "sherpa_onnx_error" in c:
        md.append(f"\nsherpa-onnx: {c['sherpa_onnx_error']}")
    md += [
        "",
        "Capacity, real-time-paced Realtime clients, finals from the stream:",
        "",
        "| setup | clients | turns | final p95 first / last third s | server step wait p95 ms | keeps up "
        "| RSS mean MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["capacity"]:
        md.append(
            f"| {r['setup']} | {r['clients']} | {r['turns']} | {r['final_p95_first_third_s']} / "
            f"{r['final_p95_last_third_s']} | {r['server_step_wait_ms']['p95']} | {'yes' if r['flat'] else 'no'} | "
            f"{(r['rss_mb'] or {}).get('mean')} |"
        )
    return "\n".join(md)


if __name__ == "__main__":
    main()
