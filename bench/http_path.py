"""What the HTTP path costs on top of the model, with uvicorn's pure-Python and C fast paths.

    .venv/bin/python -m bench.http_path [--repeats N]

One model file (the ``stt_hi_conformer_ctc_medium``-shaped package of ``bench.common``), clips of
1 s and 10 s, timed round-robin in one run (0.1 s apart, so machine noise hits all alike):
  in-process   ``Recognizer.transcribe`` (features + ONNX Runtime + CTC), same thread count
  h11+asyncio  the real server with ``ASR_HTTP=h11 ASR_LOOP=asyncio`` (uvicorn's pure-Python parser)
  httptools+uvloop  the real server with ``ASR_HTTP=httptools ASR_LOOP=uvloop`` (the default now)
Each HTTP request is a multipart upload of a WAV, client-timed with a kept-alive connection.
Prints median ms and the ratio to in-process; writes ``bench/results/http_path.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import httpx
import numpy as np

from bench.common import NAME, RESULTS, cpu_info, medium_model, server_env, speech, wav_bytes
from service.config import available_cpus
from service.models import ModelPackage, Recognizer
from testkit.server import running_server

VARIANTS = {"h11+asyncio": ("h11", "asyncio"), "httptools+uvloop": ("httptools", "uvloop")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    models, tokens = medium_model()
    rec = Recognizer(ModelPackage.open(models, tokens, NAME), "cpu", args.threads, 1)
    base = server_env(models, tokens, ASR_INTRA_OP_THREADS=str(args.threads))
    out: dict[str, object] = {"machine": cpu_info(), "threads": args.threads, "rows": []}
    with (
        running_server({**base, "ASR_HTTP": "h11", "ASR_LOOP": "asyncio"}) as slow_url,
        running_server({**base, "ASR_HTTP": "httptools", "ASR_LOOP": "uvloop"}) as fast_url,
        httpx.Client(timeout=120) as client,
    ):
        urls = {"h11+asyncio": slow_url, "httptools+uvloop": fast_url}
        for seconds in (1, 10):
            x = speech(float(seconds), seed=seconds)
            data = wav_bytes(x)

            def http(url: str, data: bytes = data) -> Callable[[np.ndarray], object]:
                return lambda _x: client.post(f"{url}/transcribe", files={"file": ("a.wav", data)}).raise_for_status()

            runs: dict[str, Callable[[np.ndarray], object]] = {
                "in-process": lambda a: rec.transcribe([a]),
                **{k: http(u) for k, u in urls.items()},
            }
            for fn in runs.values():  # warm-up
                fn(x)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    time.sleep(0.1)
                    t0 = time.perf_counter()
                    fn(x)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "clip_s": seconds,
                "median_ms": {k: round(1000 * v, 2) for k, v in med.items()},
                "ratio_to_in_process": {k: round(v / med["in-process"], 3) for k, v in med.items()},
            }
            out["rows"].append(row)  # type: ignore[attr-defined]
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_path.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
