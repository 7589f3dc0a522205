"""Big models on this CPU: Parakeet-CTC 0.6B / 1.1B shapes, exported, loaded and served.

    .venv/bin/python -m bench.big_model [--arch parakeet_0.6b] [--precisions float32 int8] [--repeats 3]

The model is NeMo-built with random weights in the exact shape of nvidia/parakeet-ctc-0.6b
(or -1.1b): FastConformer, d_model 1024, 24 (42) layers, 8x depthwise subsampling, a
1024-piece SentencePiece vocabulary trained on ``training/data/text/train.txt`` when it is there.
It is built once into ``.cache/bench/big`` (about 1 min and 3 GB RSS for 0.6B) and exported per
precision with ``export_to_onnx.py`` as users run it (``--quantize int8`` for int8); past 2 GB
the exporter writes the weights to ``model.onnx.data`` (ONNX external data).

Per precision it reports:
  export     wall seconds and the exporter's peak RSS
  weights    bytes of model.onnx (+ model.onnx.data)
  cold start the real server (``python -m service``): seconds from process start to ``/health``
             ready, and to the answer of a first 10 s clip. The package files are in the page
             cache (just exported or read): a cold disk adds its read time.
  memory     server RSS sampled every 20 ms: its peak during load, at ready, after the requests,
             and each as a ratio to the weights' bytes
  speed      median latency and RTFx (audio s / wall s) of 10 s and 60 s clips through HTTP
Writes ``bench/results/big_model_<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, cpu_info, rss_mb, speech, wav_bytes
from testkit.nemo import EXPORT_PYTHON, ROOT
from testkit.server import free_port

BIG = ROOT / ".cache" / "bench" / "big"
CORPUS = ROOT / "training" / "data" / "text" / "train.txt"


def run_logged(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; (wall seconds, its peak RSS in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def nemo_model(arch: str) -> Path:
    path = BIG / arch / "nemo" / "model.nemo"
    if not path.exists():
        print(f"building the {arch}-shaped model with NeMo (once) ...", flush=True)
        text = ["--text", str(CORPUS)] if CORPUS.exists() else []
        run_logged(
            [str(EXPORT_PYTHON), "tests/nemo_side/build_model.py", "--out", str(path.parent), "--arch", arch,
             "--vocab-size", "1024" if text else "128", *text]
        )  # fmt: skip
    return path


def package(arch: str, precision: str) -> tuple[str, dict[str, Any]]:
    """Export (once) the package of ``arch`` in ``precision``; its name and how the export went."""
    name = f"{arch}_{precision}"
    pkg, stamp = BIG / "models" / name, BIG / f"{name}.export.json"
    if not (pkg / "model.json").exists() or not stamp.exists():
        src = nemo_model(arch)
        print(f"exporting {name} ...", flush=True)
        quant = ["--quantize", "int8"] if precision == "int8" else []
        wall, peak = run_logged(
            [str(EXPORT_PYTHON), "export_to_onnx.py", str(src), "--name", name, "--language", "en",
             "--models-dir", str(BIG / "models"), "--tokens-dir", str(BIG / "tokens"), "--max-audio-s", "600", *quant]
        )  # fmt: skip
        stamp.write_text(json.dumps({"export_s": round(wall, 1), "export_peak_rss_mb": round(peak)}))
    return name, json.loads(stamp.read_text())


class RssSampler(threading.Thread):
    """Samples a process's RSS every 20 ms; ``peak`` since start, ``now()`` on demand."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    def now(self) -> float:
        return rss_mb(self.pid)


def serve(name: str, repeats: int) -> dict[str, Any]:
    manifest = json.loads((BIG / "models" / name / "model.json").read_text())
    files = [BIG / "models" / name / manifest["onnx"]["file"]]
    if manifest["onnx"].get("external_data"):
        files.append(BIG / "models" / name / manifest["onnx"]["external_data"]["file"])
    weights = sum(f.stat().st_size for f in files)
    for f in files:  # into the page cache, so every precision starts from the same place
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    port = free_port()
    env = {
        **os.environ,
        "ASR_MODEL_DIR": str(BIG / "models"),
        "ASR_TOKENS_DIR": str(BIG / "tokens"),
        "ASR_DEFAULT_MODEL": name,
        "ASR_MAX_DURATION_S": "300",
        "ASR_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    clips = {s: wav_bytes(speech(s, seed=s)) for s in (10, 60)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        with httpx.Client(timeout=600) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            ready_s = time.perf_counter() - t0
            load_peak, at_ready = sampler.peak, sampler.now()
            client.post(f"{url}/transcribe", files={"file": ("a.wav", clips[10])}).raise_for_status()
            first_s = time.perf_counter() - t0
            speed = {}
            for seconds, wav in clips.items():
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    client.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}).raise_for_status()
                    times.append(time.perf_counter() - t)
                med = statistics.median(times)
                speed[f"{seconds}s"] = {"median_ms": round(med * 1000), "rtfx": round(seconds / med, 2)}
                print(f"  {name} {seconds} s: {med * 1000:.0f} ms, RTFx {seconds / med:.2f}", flush=True)
            after = sampler.now()
    finally:
        sampler.stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    mb = weights / 2**20
    return {
        "weights_mb": round(mb),
        "files": [f.name for f in files],
        "ready_s": round(ready_s, 2),
        "first_answer_s": round(first_s, 2),
        "rss_mb": {"load_peak": round(load_peak), "at_ready": round(at_ready), "after_requests": round(after)},
        "rss_over_weights": {
            "load_peak": round(load_peak / mb, 2),
            "at_ready": round(at_ready / mb, 2),
            "after_requests": round(after / mb, 2),
        },
        "speed": speed,
        "parameters": manifest["parameters"],
        "max_abs_diff_vs_nemo": manifest["onnx"]["max_abs_diff_vs_nemo"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["parakeet_0.6b", "parakeet_1.1b"], default="parakeet_0.6b")
    p.add_argument("--precisions", nargs="+", choices=["float32", "int8"], default=["float32", "int8"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out: dict[str, Any] = {"machine": cpu_info(), "arch": args.arch, "results": {}}
    for precision in args.precisions:
        name, export = package(args.arch, precision)
        row = {**export, **serve(name, args.repeats)}
        out["results"][precision] = row
        print(json.dumps({precision: row}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"big_model_{args.arch}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
