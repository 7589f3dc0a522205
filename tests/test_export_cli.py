"""export_to_onnx.py as users run it: its help, its errors, and what it writes."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import onnxruntime as ort
import pytest

from service.decoding import read_token_map
from tests.conftest import ROOT, NemoModel, require_export_python, run_nemo_cached


def export(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    py = require_export_python()
    return subprocess.run(
        [py, str(ROOT / "export_to_onnx.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_help_explains_itself() -> None:
    r = export("--help")
    assert r.returncode == 0
    for word in (".nemo", "pretrained", "--name", "--language", "models/<name>/model.onnx", "tokens/<name>.txt"):
        assert word in r.stdout


def test_not_a_nemo_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "model.nemo"
    bogus.write_bytes(b"definitely not a tar archive" * 100)
    r = export(str(bogus))
    assert r.returncode == 2 and "not a .nemo archive" in r.stderr


def test_missing_file(tmp_path: Path) -> None:
    r = export(str(tmp_path / "absent.nemo"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_tar_without_a_model(tmp_path: Path) -> None:
    archive = tmp_path / "empty.nemo"
    (tmp_path / "readme.txt").write_text("hello")
    with tarfile.open(archive, "w") as t:
        t.add(tmp_path / "readme.txt", arcname="readme.txt")
    r = export(str(archive))
    assert r.returncode == 2 and "could not restore" in r.stderr


def test_pretrained_name_without_network() -> None:
    r = export("stt_en_conformer_ctc_small")
    assert r.returncode == 2
    assert "no network" in r.stderr and "pass its path" in r.stderr


def test_non_ctc_model_is_refused(speech_dir: Path) -> None:
    work = run_nemo_cached("rnnt", [], [["tests/nemo_side/build_model.py", "--out", "{work}/nemo", "--arch", "rnnt"]])
    r = export(str(work / "nemo" / "model.nemo"), "--models-dir", str(work / "m"), "--tokens-dir", str(work / "t"))
    assert r.returncode == 2 and "is not a CTC model" in r.stderr
    assert not (work / "m").exists()


def test_package_contents(nemo_model: NemoModel) -> None:
    meta = json.loads((nemo_model.model_dir / nemo_model.name / "model.json").read_text())
    assert meta["nemo_version"] and meta["onnx"]["sha256"]
    assert meta["onnx"]["max_abs_diff_vs_nemo"] <= 1e-3
    assert meta["features"]["framing"] == "zero_pad"  # exported with NeMo 3.0.0
    assert meta["encoder"]["max_audio_s"] == 300
    pieces = read_token_map(nemo_model.tokens_dir / meta["vocabulary"]["tokens_file"])
    assert pieces[-1] == "<blk>" and len(pieces) == meta["vocabulary"]["size"] + 1
    onnx_meta = (
        ort.InferenceSession(
            str(nemo_model.model_dir / nemo_model.name / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        .get_modelmeta()
        .custom_metadata_map
    )
    assert onnx_meta["vocab_size"] == str(len(pieces))
    assert onnx_meta["subsampling_factor"] == str(meta["encoder"]["subsampling"]["factor"])
    assert onnx_meta["normalize_type"] == "per_feature"
    assert onnx_meta["model_type"] == ("EncDecCTCModel" if nemo_model.arch == "char" else "EncDecCTCModelBPE")
    expected_class = {"char": "EncDecCTCModel", "hybrid": "EncDecHybridRNNTCTCBPEModel"}
    assert meta["model_class"] == expected_class.get(nemo_model.arch, "EncDecCTCModelBPE")


def _run_noise(model_dir: Path, tokens_dir: Path, name: str, seconds: float) -> None:
    import numpy as np

    from service.models import ModelPackage, Recognizer

    rec = Recognizer(ModelPackage.open(model_dir, tokens_dir, name))
    rng = np.random.default_rng(0)
    lp, n = rec.logprobs([(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)])
    assert lp.shape[1] >= int(n[0]) > seconds / 0.04 - 2


@pytest.mark.parametrize("seconds", [250.0, 300.0])
def test_inputs_past_200_s_run(conformer: NemoModel, seconds: float) -> None:
    """NeMo's default positional table stops at ~200 s; the export raises it to --max-audio-s
    (300 here), and an input of exactly that length still runs."""
    _run_noise(conformer.model_dir, conformer.tokens_dir, conformer.name, seconds)


def test_short_limit_makes_a_smaller_graph(conformer: NemoModel) -> None:
    """The positional table is sized to --max-audio-s, also below NeMo's 5000 frames (the shipped
    default model relies on it to fit its size budget); the limit itself still runs."""
    work = run_nemo_cached(
        "short-limit",
        [conformer.nemo_path],
        [
            [
                "export_to_onnx.py",
                str(conformer.nemo_path),
                "--name",
                "short",
                "--models-dir",
                "{work}/m",
                "--tokens-dir",
                "{work}/t",
                "--max-audio-s",
                "20",
            ]
        ],
    )
    meta = json.loads((work / "m" / "short" / "model.json").read_text())
    assert meta["encoder"]["max_audio_s"] == 20 and meta["onnx"]["max_abs_diff_vs_nemo"] <= 1e-3
    # d_model 64, float32: the 300 s table has 2 x 7500 rows, the 20 s one 2 x 500.
    saved = (conformer.model_dir / conformer.name / "model.onnx").stat().st_size - (
        work / "m" / "short" / "model.onnx"
    ).stat().st_size
    assert saved >= 0.95 * 2 * (7500 - 500) * 64 * 4
    _run_noise(work / "m", work / "t", "short", 20.0)
