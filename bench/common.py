"""Shared by the benchmarks: the medium-shaped model, real speech clips, a running server.

The model has the exact shape of ``stt_hi_conformer_ctc_medium`` (d_model 256, 18 layers,
4 heads, subsampling x4, 128 tokens) with random weights: built by NeMo
(``tests/nemo_side/build_model.py --arch medium``) and exported by ``export_to_onnx.py`` into
``.cache/bench`` (git-ignored), once. Speed depends on the shape, not the weights.
Clips are espeak-ng speech (``testkit.speech.synthesize``) joined to the lengths asked for.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from testkit.nemo import EXPORT_PYTHON, ROOT
from testkit.speech import SENTENCES, VOICES, synthesize

CACHE = ROOT / ".cache" / "bench"
NAME = "bench_medium_ctc"
INT8_NAME = "bench_medium_ctc_int8"
RESULTS = ROOT / "bench" / "results"


def medium_model(precision: str = "float32") -> tuple[Path, Path]:
    """(models dir, tokens dir) holding the medium-shaped package; built on first use (~2 min).

    ``precision="int8"`` also exports the same NeMo model with ``--quantize int8`` as
    ``bench_medium_ctc_int8`` (``INT8_NAME``), beside the float32 one.
    """
    models, tokens = CACHE / "models", CACHE / "tokens"
    name = NAME if precision == "float32" else INT8_NAME
    if (models / name / "model.json").exists():
        return models, tokens
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    py = str(EXPORT_PYTHON)
    if not (CACHE / "nemo" / "model.nemo").exists():
        print("building the medium-shaped model with NeMo (once) ...", flush=True)
        subprocess.run(
            [py, "tests/nemo_side/build_model.py", "--out", str(CACHE / "nemo"), "--arch", "medium",
             "--vocab-size", "128"],
            check=True, cwd=ROOT, env=env,
        )  # fmt: skip
    quant = ["--quantize", "int8"] if precision == "int8" else []
    subprocess.run(
        [py, "export_to_onnx.py", str(CACHE / "nemo" / "model.nemo"), "--name", name, "--language", "hi",
         "--models-dir", str(models), "--tokens-dir", str(tokens), "--max-audio-s", "300", *quant],
        check=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return models, tokens


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """``seconds`` of espeak-ng speech at 16 kHz (sentences joined, cut to length)."""
    d = CACHE / "speech"
    d.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(len(SENTENCES)):
        p = d / f"s{i:02d}.wav"
        if not p.exists():
            synthesize(SENTENCES[i], VOICES[i % len(VOICES)], 150, p)
        parts.append(sf.read(p, dtype="float32")[0])
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    n = int(seconds * 16000)
    while sum(len(x) for x in out) < n:
        out.append(parts[int(rng.integers(len(parts)))])
    return np.concatenate(out)[:n]


def wav_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, 16000, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def server_env(models: Path, tokens: Path, **extra: str) -> dict[str, str]:
    return {"ASR_MODEL_DIR": str(models), "ASR_TOKENS_DIR": str(tokens), "ASR_DEFAULT_MODEL": NAME, **extra}


def rss_mb(pid: int) -> float:
    """A process's resident memory now, MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_info() -> str:
    from service.config import available_cpus

    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
    model = names[0] if names else "unknown CPU"
    return f"{available_cpus()} usable CPUs ({model})"
