"""ONNX Runtime session settings, measured: graph optimization level and a saved optimized graph.

    .venv/bin/python -m bench.ort_settings [--repeats N]

On the ``stt_hi_conformer_ctc_medium``-shaped package (``bench.common``), for each graph
optimization level: the time to create the session (cold start; the median of 3) and the median
``run`` on 10 s of features, side by side in one process; then the same for a session that
loads the graph ``ORT_ENABLE_ALL`` optimized and saved (``optimized_model_filepath``), with
optimization off, which is what saving the optimized graph would buy a big model's start.
Writes ``bench/results/ort_settings.json``. ``service/engine.py`` records what it uses and why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.common import NAME, RESULTS, cpu_info, medium_model, speech
from service.config import available_cpus
from service.models import ModelPackage, Recognizer

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def options(threads: int, level: ort.GraphOptimizationLevel, save: Path | None = None) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.graph_optimization_level = level
    o.enable_cpu_mem_arena = False  # as service/engine.py runs it
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_settings.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
