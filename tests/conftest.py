"""Shared fixtures: real audio files, and small NeMo models built, exported and run by NeMo itself.

The NeMo side runs in its own virtual environment (``ASR_EXPORT_PYTHON``, default
``.venv-export/bin/python``), as a subprocess, so this test process (the runtime's venv) never
imports torch or NeMo. Its outputs are cached under ``.cache/nemo-fixture/<hash>``, keyed by the
content of every script involved and of the audio, so a change to any of them rebuilds.
When that interpreter is missing the NeMo tests are skipped locally, but fail under CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from testkit.nemo import CACHE, EXPORT_PYTHON, IN_CI, ROOT
from testkit.speech import HINDI_SENTENCES, SENTENCES, VOICES, synthesize

__all__ = ["CACHE", "EXPORT_PYTHON", "IN_CI", "ROOT", "SENTENCES", "VOICES", "synthesize"]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real audio: >= 20 clips at 16 kHz mono 16-bit: espeak-ng speech, noise, edge lengths."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install espeak-ng sox); tests/run.sh installs it")
    d = tmp_path_factory.mktemp("speech")
    for i, text in enumerate(SENTENCES):
        synthesize(text, VOICES[i % len(VOICES)], 130 + 15 * (i % 5), d / f"speech_{i:02d}.wav")
    rng = np.random.default_rng(1234)
    sf.write(d / "noise_white_2s.wav", (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000, subtype="PCM_16")
    brown = np.cumsum(rng.standard_normal(48000)).astype(np.float32)
    sf.write(d / "noise_brown_3s.wav", 0.5 * brown / np.abs(brown).max(), 16000, subtype="PCM_16")
    # Speech on a DC offset with clipping. (Digital silence is tested on its own: see
    # service.features.FeatureExtractor._normalize for why NeMo's value there is not portable.)
    speech1, _ = sf.read(d / "speech_01.wav", dtype="float32")
    sf.write(d / "dc_clipped.wav", np.clip(speech1 * 4 + 0.3, -1, 1), 16000, subtype="PCM_16")
    # Edge lengths: exactly 0.5 s, and odd sample counts that do not divide by the hop.
    speech0, _ = sf.read(d / "speech_00.wav", dtype="int16")
    sf.write(d / "edge_0p5s.wav", speech0[:8000], 16000, subtype="PCM_16")
    sf.write(d / "edge_odd_16001.wav", speech0[:16001], 16000, subtype="PCM_16")
    sf.write(d / "edge_odd_12345.wav", speech0[2000:14345], 16000, subtype="PCM_16")
    return d


def speech_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.wav"))


@dataclass(frozen=True)
class NemoModel:
    """A NeMo model exported to a package, with NeMo's reference outputs on ``files``."""

    name: str
    arch: str
    nemo_path: Path
    model_dir: Path
    tokens_dir: Path
    files: list[Path]
    arrays: dict[str, np.ndarray]
    transcripts: list[str]
    words: list[list[dict[str, Any]]]  # NeMo's transcribe(timestamps=True) word offsets per file


def _digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# Fixtures that build or run NeMo models: a test that takes one is in the ``nemo`` tier.
NEMO_FIXTURES = {
    "conformer",
    "nemo_model",
    "char_model",
    "local",
    "nemo_features",
    "hindi",
    "nemo_server",
    "cache_aware",
}
FAST_TIER = os.environ.get("ASR_TEST_TIER", "") == "fast"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NEMO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nemo)


def require_export_python() -> str:
    if FAST_TIER:  # tests/run.sh --fast: a test that gets here is missing its mark
        pytest.fail("this test needs the NeMo environment: mark it @pytest.mark.nemo (or take a NeMo fixture)")
    if not EXPORT_PYTHON.exists():
        msg = f"NeMo export interpreter {EXPORT_PYTHON} not found (tests/run.sh creates .venv-export)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return str(EXPORT_PYTHON)


def run_nemo_cached(tag: str, inputs: list[Path], steps: list[list[str]]) -> Path:
    """Run NeMo-side commands once per distinct content; return their work directory.

    ``steps`` are argument lists for the export interpreter; ``{work}`` in them is replaced by
    the work directory. The cache key covers the NeMo-side scripts, the exporter, the runtime
    code the exporter imports, every input file and the commands themselves.
    """
    py = require_export_python()
    scripts = [
        *sorted((ROOT / "tests" / "nemo_side").glob("*.py")),
        ROOT / "export_to_onnx.py",
        # runtime modules the exporter imports (package contract, length formula, checksum)
        *(ROOT / "service" / f"{m}.py" for m in ("decoding", "features", "package")),
    ]
    # Inputs live in per-session temp dirs: key on their names and content, not their paths.
    where = {str(p): p.name for p in inputs}
    key = _digest(scripts + inputs, json.dumps([[where.get(a, a) for a in step] for step in steps]))
    work = CACHE / "nemo-fixture" / f"{tag}-{key}"
    if (work / "done").exists():
        return work
    for stale in work.parent.glob(f"{tag}-*"):  # one entry per tag: the cache stays small
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for step in steps:
        cmd = [py] + [a.replace("{work}", str(work)) for a in step]
        try:
            _run(cmd, env=env, cwd=ROOT)
        except subprocess.CalledProcessError as e:
            sys.stderr.write(e.stdout[-5000:] + e.stderr[-5000:])
            pytest.fail(f"NeMo-side step failed: {' '.join(cmd[1:3])} (exit {e.returncode})")
    (work / "done").write_text("ok")
    return work


def build_nemo_model(arch: str, files: list[Path]) -> NemoModel:
    """Build a random NeMo model, export it with export_to_onnx.py, and record NeMo's outputs."""
    name = f"test_{arch}"
    nemo_side = "tests/nemo_side"
    work = run_nemo_cached(
        arch,
        files,
        [
            [f"{nemo_side}/build_model.py", "--out", "{work}/nemo", "--arch", arch]
            + (["--vocab-size", "128"] if arch == "hindi" else []),  # Devanagari needs more pieces
            [
                "export_to_onnx.py",
                "{work}/nemo/model.nemo",
                "--name",
                name,
                "--language",
                "hi" if arch == "hindi" else "en",
                "--models-dir",
                "{work}/models",
                "--tokens-dir",
                "{work}/tokens",
                "--max-audio-s",
                "300",
            ],
            [f"{nemo_side}/reference.py", "--nemo", "{work}/nemo/model.nemo", "--out", "{work}/ref"]
            + [str(f) for f in files],
        ],
    )
    ref = json.loads((work / "ref" / "reference.json").read_text())
    with np.load(work / "ref" / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return NemoModel(
        name=name,
        arch=arch,
        nemo_path=work / "nemo" / "model.nemo",
        model_dir=work / "models",
        tokens_dir=work / "tokens",
        files=files,
        arrays=arrays,
        transcripts=ref["transcripts"],
        words=ref["words"],
    )


@pytest.fixture(scope="session")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, str]]:
    """Three spoken English sentences at 16 kHz, with their text (live sessions stream them)."""
    d = tmp_path_factory.mktemp("rt")
    out = []
    for i, t in enumerate(SENTENCES[:3]):
        x, _ = sf.read(synthesize(t, "en-us", 150, d / f"s{i}.wav"), dtype="float32")
        out.append((x, t))
    return out


@pytest.fixture(scope="session")
def hindi_speech_dir(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hindi speech (espeak-ng's hi voice) plus the noise and edge-length clips of ``speech_dir``."""
    d = tmp_path_factory.mktemp("speech_hi")
    for i, text in enumerate(HINDI_SENTENCES):
        synthesize(text, "hi", 130 + 15 * (i % 4), d / f"speech_hi_{i:02d}.wav")
    for extra in speech_dir.glob("*.wav"):
        if not extra.name.startswith("speech_"):
            shutil.copy(extra, d / extra.name)
    return d


@pytest.fixture(scope="session", params=["conformer", "fastconformer", "char", "hybrid", "hindi"])
def nemo_model(request: pytest.FixtureRequest, speech_dir: Path) -> NemoModel:
    """Each test that takes this runs once per architecture (the Hindi model on Hindi speech)."""
    if request.param == "hindi":
        return request.getfixturevalue("hindi")
    return build_nemo_model(request.param, speech_files(speech_dir))


@pytest.fixture(scope="session")
def hindi(hindi_speech_dir: Path) -> NemoModel:
    """A Conformer-CTC with a Devanagari SentencePiece vocabulary, language hi."""
    return build_nemo_model("hindi", speech_files(hindi_speech_dir))


@pytest.fixture(scope="session")
def conformer(speech_dir: Path) -> NemoModel:
    return build_nemo_model("conformer", speech_files(speech_dir))
