"""Side by side on one model, one audio set, one thread count: who is fastest, and how near the limit?

    .venv/bin/python -m bench.peers [--threads N] [--repeats R] [--precisions float32 int8]

Runtimes, each on the float32 package and on its ``--quantize int8`` export (all in this process
tree, timed round-robin with a 0.1 s pause between runs, so machine noise hits them alike and no
runtime's spinning threads slow the next one):
  floor      bare ``InferenceSession.run`` on precomputed features (no features, no decoding)
  ours       this project's runtime in process (``Recognizer.transcribe``: features + ORT + CTC)
  ours-no-arena  the same without ONNX Runtime's CPU memory arena (``ASR_CPU_MEM_ARENA=false``)
  ours-http  the real server (``python -m service``, default settings, both packages loaded)
             through HTTP, client-timed
  sherpa     sherpa-onnx ``OfflineRecognizer.from_nemo_ctc`` on the same file
  onnx-asr   onnx-asr ``nemo-conformer-ctc`` on the same folder
Prints, per clip length (1, 10, 60 s), the median latency, its ratio to the float32 floor, RTFx,
and the share of this CPU's GEMM peak the runtime reaches: the model's multiply-accumulates for
the clip (``bench.macs.model_macs``, from ONNX Runtime's profile) per second of latency, over
the peak of the runtime's precision (``bench.macs.gemm_peak``, measured in the same run).
Writes bench/results/peers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from bench.common import INT8_NAME, NAME, RESULTS, cpu_info, medium_model, server_env, speech, wav_bytes
from bench.macs import gemm_peak, model_macs
from service.config import available_cpus
from service.models import ModelPackage, Recognizer
from service.package import write_peer_files
from testkit.server import running_server

Runner = Callable[[np.ndarray], str]


def session_options(threads: int) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return o


class Clips:
    """The clip being timed, in each form a runtime takes (features, WAV bytes), by ``id``."""

    def __init__(self) -> None:
        self.feats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.wavs: dict[int, bytes] = {}


def runtimes_for(pkg: ModelPackage, tokens: Path, threads: int, clips: Clips, http: Runner) -> dict[str, Runner]:
    import onnx_asr
    import sherpa_onnx

    ours = Recognizer(pkg, "cpu", threads, 1)
    floor = ort.InferenceSession(str(pkg.onnx_path), session_options(threads), providers=["CPUExecutionProvider"])
    sherpa = sherpa_onnx.OfflineRecognizer.from_nemo_ctc(
        model=str(pkg.onnx_path), tokens=str(pkg.tokens_path), num_threads=threads, feature_dim=80
    )
    write_peer_files(pkg.onnx_path.parent, tokens)  # a package exported before they were part of it
    oasr = onnx_asr.load_model("nemo-conformer-ctc", str(pkg.onnx_path.parent), sess_options=session_options(threads))

    def run_floor(x: np.ndarray) -> str:
        feats, lengths = clips.feats[id(x)]
        floor.run(None, {"audio_signal": feats, "length": lengths})
        return ""

    def run_sherpa(x: np.ndarray) -> str:
        s = sherpa.create_stream()
        s.accept_waveform(16000, x)
        sherpa.decode_stream(s)
        return str(s.result.text).strip()

    # The runtime without ONNX Runtime's arena (ASR_CPU_MEM_ARENA=false): what the arena buys.
    ours_no_arena = Recognizer(pkg, "cpu", threads, 1, cpu_mem_arena=False)
    return {
        "floor": run_floor,
        "ours": lambda x: ours.transcribe([x])[0].text,
        "ours-no-arena": lambda x: ours_no_arena.transcribe([x])[0].text,
        "ours-http": http,
        "sherpa": run_sherpa,
        "onnx-asr": lambda x: str(oasr.recognize(x, sample_rate=16000)).strip(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--repeats", type=int, default=0, help="per clip length; 0 = 15 / 7 / 3 for 1 / 10 / 60 s")
    p.add_argument("--precisions", nargs="+", choices=["float32", "int8"], default=["float32", "int8"])
    args = p.parse_args()
    names = {"float32": NAME, "int8": INT8_NAME}
    models, tokens = medium_model()
    for precision in args.precisions:
        medium_model(precision)
    pkgs = {pr: ModelPackage.open(models, tokens, names[pr]) for pr in args.precisions}
    peak = gemm_peak(args.threads)
    print(f"GEMM peak: float32 {peak['float32'] / 1e9:.0f}, int8 {peak['int8'] / 1e9:.0f} G MAC/s", flush=True)
    float_pkg = ModelPackage.open(models, tokens, NAME)
    features = Recognizer(float_pkg).features

    clips = Clips()
    env = server_env(
        models,
        tokens,
        ASR_INTRA_OP_THREADS=str(args.threads),
        ASR_MAX_DURATION_S="300",
        ASR_PRELOAD_MODELS=",".join(names[pr] for pr in args.precisions),
    )
    with running_server(env, timeout_s=180) as url, httpx.Client(timeout=600) as client:

        def http(model: str) -> Runner:
            def run(x: np.ndarray) -> str:
                r = client.post(
                    f"{url}/transcribe", files={"file": ("a.wav", clips.wavs[id(x)])}, data={"model": model}
                )
                r.raise_for_status()
                return str(r.json()["text"])

            return run

        runtimes: dict[str, Runner] = {}
        precision_of: dict[str, str] = {}
        for pr, pkg in pkgs.items():
            suffix = "" if pr == "float32" else "-int8"
            for name, fn in runtimes_for(pkg, tokens, args.threads, clips, http(names[pr])).items():
                runtimes[name + suffix] = fn
                precision_of[name + suffix] = pr
        base = "floor" if "float32" in pkgs else "floor-int8"
        results = []
        for seconds, default_r in ((1, 15), (10, 7), (60, 3)):
            x = speech(seconds, seed=seconds)
            clips.feats[id(x)] = features.batch([x])
            clips.wavs[id(x)] = wav_bytes(x)
            macs = model_macs(float_pkg.onnx_path, *clips.feats[id(x)])
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
                "macs": macs,
                "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
                "ratio_to_float32_floor": {k: round(v / med[base], 3) for k, v in med.items()},
                "rtfx": {k: round(seconds / v, 1) for k, v in med.items()},
                "share_of_peak": {k: round(macs / v / peak[precision_of[k]], 3) for k, v in med.items()},
                "transcripts_agree_with_ours": {
                    k: texts[k] == texts["ours" + ("" if precision_of[k] == "float32" else "-int8")]
                    for k in runtimes
                    if not k.startswith("floor")
                },
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": cpu_info(),
        "threads": args.threads,
        "model": "stt_hi_conformer_ctc_medium shape, random weights",
        "gemm_peak_macs_per_s": {k: round(v) for k, v in peak.items()},
    }
    (RESULTS / "peers.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    lines = [
        f"Machine: {meta['machine']}; {args.threads} threads each; model: {meta['model']}. "
        f"GEMM peak through ONNX Runtime: float32 {peak['float32'] / 1e9:.0f} G MAC/s, "
        f"int8 {peak['int8'] / 1e9:.0f} G MAC/s. Model: "
        + ", ".join(f"{r['macs'] / 1e9:.1f} G MACs at {r['clip_s']} s" for r in results)
        + ".",
        "",
        "Cells: median latency (ratio to the float32 floor; share of the precision's GEMM peak).",
        "",
        "| runtime | " + " | ".join(f"{r['clip_s']} s" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in runtimes:
        cells = [
            f"{r['median_ms'][name]:.0f} ms ({r['ratio_to_float32_floor'][name]:.2f}x; "
            f"{r['share_of_peak'][name] * 100:.0f} %)"
            for r in results
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Transcripts equal to ours (same precision): "
        + "; ".join(f"{r['clip_s']} s: {r['transcripts_agree_with_ours']}" for r in results),
    ]
    (RESULTS / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
