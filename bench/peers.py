"""Side by side on one model file, one audio set, one thread count: who is fastest?

    .venv/bin/python bench/peers.py [--threads N] [--repeats R]

Runtimes (all in this process tree, timed round-robin with a 0.1 s pause between runs, so
machine noise hits them alike and no runtime's spinning threads slow the next one):
  floor      bare ``InferenceSession.run`` on precomputed features (no features, no decoding)
  ours       this project's runtime in process (``Recognizer.transcribe``: features + ORT + CTC)
  ours-http  the real server (``python -m service``, default settings) through HTTP, client-timed
  sherpa     sherpa-onnx ``OfflineRecognizer.from_nemo_ctc``
  onnx-asr   onnx-asr ``nemo-conformer-ctc``
Prints median latency per clip length, its ratio to the floor, RTFx (audio s / compute s), and
whether the transcripts agree; writes bench/results/peers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import httpx
import numpy as np
import onnxruntime as ort

from bench.common import NAME, RESULTS, cpu_info, medium_model, server_env, speech, wav_bytes
from service.config import available_cpus
from service.models import ModelPackage, Recognizer
from service.package import write_peer_files
from testkit.server import running_server


def session_options(threads: int) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return o


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--repeats", type=int, default=0, help="per clip length; 0 = 15 / 7 / 3 for 1 / 10 / 60 s")
    args = p.parse_args()
    models, tokens = medium_model()
    pkg = ModelPackage.open(models, tokens, NAME)
    ours = Recognizer(pkg, "cpu", args.threads, 1)
    floor = ort.InferenceSession(str(pkg.onnx_path), session_options(args.threads), providers=["CPUExecutionProvider"])

    import onnx_asr
    import sherpa_onnx

    sherpa = sherpa_onnx.OfflineRecognizer.from_nemo_ctc(
        model=str(pkg.onnx_path), tokens=str(pkg.tokens_path), num_threads=args.threads, feature_dim=80
    )
    write_peer_files(pkg.onnx_path.parent, tokens)  # a package exported before they were part of it
    oasr = onnx_asr.load_model(
        "nemo-conformer-ctc", str(pkg.onnx_path.parent), sess_options=session_options(args.threads)
    )

    def run_floor(x: np.ndarray) -> str:
        feats, lengths = feats_cache[id(x)]
        floor.run(None, {"audio_signal": feats, "length": lengths})
        return ""

    def run_sherpa(x: np.ndarray) -> str:
        s = sherpa.create_stream()
        s.accept_waveform(16000, x)
        sherpa.decode_stream(s)
        return str(s.result.text).strip()

    env = server_env(models, tokens, ASR_INTRA_OP_THREADS=str(args.threads), ASR_MAX_DURATION_S="300")
    with running_server(env) as url, httpx.Client(timeout=600) as client:
        wavs: dict[int, bytes] = {}

        def run_http(x: np.ndarray) -> str:
            r = client.post(f"{url}/transcribe", files={"file": ("a.wav", wavs[id(x)])})
            r.raise_for_status()
            return str(r.json()["text"])

        runtimes: dict[str, Callable[[np.ndarray], str]] = {
            "floor": run_floor,
            "ours": lambda x: ours.transcribe([x])[0].text,
            "ours-http": run_http,
            "sherpa": run_sherpa,
            "onnx-asr": lambda x: str(oasr.recognize(x, sample_rate=16000)).strip(),
        }
        results = []
        for seconds, default_r in ((1, 15), (10, 7), (60, 3)):
            x = speech(seconds, seed=seconds)
            feats_cache = {id(x): ours.features.batch([x])}
            wavs[id(x)] = wav_bytes(x)
            texts = {name: fn(x) for name, fn in runtimes.items()}  # warm-up + transcripts
            times: dict[str, list[float]] = {name: [] for name in runtimes}
            for _ in range(args.repeats or default_r):
                for name, fn in runtimes.items():
                    # ONNX Runtime's pool threads spin for a while after a run; let the previous
                    # runtime's threads go idle so they do not steal this one's cores.
                    time.sleep(0.1)
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {
                "clip_s": seconds,
                "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
                "ratio_to_floor": {k: round(v / med["floor"], 3) for k, v in med.items()},
                "rtfx": {k: round(seconds / v, 1) for k, v in med.items()},
                "transcripts_agree": {
                    "ours==ours-http": texts["ours"] == texts["ours-http"],
                    "ours==onnx-asr": texts["ours"] == texts["onnx-asr"],
                    "ours==sherpa": texts["ours"] == texts["sherpa"],
                },
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": cpu_info(), "threads": args.threads, "model": "stt_hi_conformer_ctc_medium shape, random"}
    (RESULTS / "peers.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    names = list(runtimes)
    lines = [
        f"Machine: {meta['machine']}; {args.threads} threads each; model: {meta['model']} weights.",
        "",
        "| clip | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for r in results:
        cells = [f"{r['median_ms'][n]:.0f} ms ({r['ratio_to_floor'][n]:.2f}x, RTFx {r['rtfx'][n]:g})" for n in names]
        lines.append(f"| {r['clip_s']} s | " + " | ".join(cells) + " |")
    lines += ["", "Transcripts agree: " + "; ".join(f"{r['clip_s']} s: {r['transcripts_agree']}" for r in results)]
    (RESULTS / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
