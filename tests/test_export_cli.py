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

pytestmark = pytest.mark.nemo  # every test here runs export_to_onnx.py or NeMo


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


_FP16_PROBE = """
import sys, tempfile
from pathlib import Path
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from export_to_onnx import store_fp16_where_lossless

rng = np.random.default_rng(0)
exact = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)  # float16 values
inexact = rng.standard_normal((64, 32)).astype(np.float32)  # random float32: not
small = rng.standard_normal((1, 32)).astype(np.float16).astype(np.float32)  # exact, but under 1024 values
huge = exact.copy()
huge[0, 0] = 1e6  # beyond float16's range: float16 would make it inf
inits = {"exact": exact, "inexact": inexact, "small": small, "huge": huge}
nodes = [
    helper.make_node("MatMul", ["x", "exact"], ["a"]),
    helper.make_node("MatMul", ["x", "inexact"], ["b"]),
    helper.make_node("MatMul", ["x", "huge"], ["c"]),
    helper.make_node("Sum", ["a", "b", "c", "small"], ["y"]),
]
graph = helper.make_graph(
    nodes, "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
    [numpy_helper.from_array(v, k) for k, v in inits.items()],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
d = Path(tempfile.mkdtemp())
path = d / "m.onnx"
onnx.save(model, str(path))
x = rng.standard_normal((5, 64)).astype(np.float32)
before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
size = path.stat().st_size
m = onnx.load(str(path))
assert store_fp16_where_lossless(m) == 1
onnx.checker.check_model(m)
onnx.save(m, str(path))
types = {i.name: i.data_type for i in m.graph.initializer}
assert types == {"exact__fp16": TensorProto.FLOAT16, "inexact": TensorProto.FLOAT,
                 "small": TensorProto.FLOAT, "huge": TensorProto.FLOAT}, types
assert [n.op_type for n in m.graph.node][0] == "Cast"
after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
assert np.array_equal(before, after)  # lossless: the same numbers, bit for bit
assert size - path.stat().st_size >= 0.9 * 64 * 32 * 2  # half its 4-byte values, less the Cast node
again = onnx.load(str(path))
assert store_fp16_where_lossless(again) == 0  # nothing left to convert
assert again == m  # and the graph is left as it is
print("ok")
"""


def test_fp16_storage_is_lossless_and_only_where_exact() -> None:
    r = subprocess.run([require_export_python(), "-c", _FP16_PROBE], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok"


def test_fp16_rounded_model_exports_at_half_the_weight(conformer: NemoModel) -> None:
    """A model whose weights are float16 values (what training/train.py saves) is stored in float16;
    one with ordinary float32 weights (the random test model) is stored as it was."""
    work = run_nemo_cached(
        "fp16-rounded",
        [conformer.nemo_path],
        [
            ["-m", "tests.nemo_side.round_fp16", str(conformer.nemo_path), "{work}/rounded.nemo"],
            [
                "export_to_onnx.py",
                "{work}/rounded.nemo",
                "--name",
                "half",
                "--models-dir",
                "{work}/m",
                "--tokens-dir",
                "{work}/t",
                "--max-audio-s",
                "300",
            ],
        ],
    )
    full = json.loads((conformer.model_dir / conformer.name / "model.json").read_text())
    half = json.loads((work / "m" / "half" / "model.json").read_text())
    assert full["onnx"]["fp16_weights"] == 0
    assert half["onnx"]["fp16_weights"] > 0
    assert half["onnx"]["max_abs_diff_vs_nemo"] <= 1e-3  # the exporter's check ran on the float16 file
    saved = (conformer.model_dir / conformer.name / "model.onnx").stat().st_size - (
        work / "m" / "half" / "model.onnx"
    ).stat().st_size
    assert saved >= 0.8 * 2 * half["parameters"], (saved, half["parameters"])
    _run_noise(work / "m", work / "t", "half", 30.0)


def test_export_can_attach_a_language_model(conformer: NemoModel, tmp_path: Path) -> None:
    """``--lm-text``: the package gets a token-level LM the runtime reads; greedy stays its default,
    and a request for beam search uses the LM."""
    from service.decoders import DecodeRequest
    from service.lm import NGramLM
    from service.models import ModelPackage, Recognizer
    from testkit.speech import SENTENCES

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(s.lower() for s in SENTENCES) + "\n")
    r = export(
        str(conformer.nemo_path), "--name", "with_lm", "--no-check", "--max-audio-s", "30",
        "--models-dir", str(tmp_path / "m"), "--tokens-dir", str(tmp_path / "t"),
        "--lm-text", str(text), "--lm-order", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attached" in r.stdout
    manifest = json.loads((tmp_path / "m" / "with_lm" / "model.json").read_text())
    assert manifest["decoding"]["method"] == "greedy" and manifest["decoding"]["lm"]["order"] == 4
    rec = Recognizer(ModelPackage.open(tmp_path / "m", tmp_path / "t", "with_lm"))
    lm = rec.decoders.language_model()
    assert isinstance(lm, NGramLM) and lm.max_order == 4
    assert rec.decoders.describe(DecodeRequest())["method"] == "greedy"
    assert rec.decoders.describe(DecodeRequest(method="beam"))["lm_weight"] == 0.5


def test_int8_export_is_served_and_reports_its_deviation(
    conformer: NemoModel, tmp_path: Path, speech_dir: Path
) -> None:
    """``--quantize int8``: the package records its precision, the NeMo check reports the quantized
    graph's deviation (it cannot be 1e-3), and the runtime serves it close to the float32 graph."""
    import numpy as np

    from service.audio import read_audio
    from service.models import ModelPackage, Recognizer
    from tests.conftest import speech_files

    r = export(
        str(conformer.nemo_path), "--name", "q8", "--quantize", "int8", "--max-audio-s", "300",
        "--models-dir", str(tmp_path / "m"), "--tokens-dir", str(tmp_path / "t"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "m" / "q8" / "model.json").read_text())
    assert manifest["onnx"]["precision"] == "int8" and "MatMul" in manifest["onnx"]["quantization"]
    assert 1e-3 < manifest["onnx"]["max_abs_diff_vs_nemo"] < 5.0
    assert manifest.get("nemo_state") is None and not (tmp_path / "m" / "q8" / "nemo_state.npz").exists()
    float_size = (conformer.model_dir / conformer.name / "model.onnx").stat().st_size
    assert (tmp_path / "m" / "q8" / "model.onnx").stat().st_size < float_size
    q8 = Recognizer(ModelPackage.open(tmp_path / "m", tmp_path / "t", "q8"))
    f32 = Recognizer(ModelPackage.open(conformer.model_dir, conformer.tokens_dir, conformer.name))
    agree, frames = 0, 0
    for f in speech_files(speech_dir)[:4]:
        x = read_audio(f, 16000)[0]
        a, _ = q8.logprobs([x])
        b, _ = f32.logprobs([x])
        assert np.abs(a - b).max() < 5.0
        agree += int((a[0].argmax(-1) == b[0].argmax(-1)).sum())
        frames += a.shape[1]
    assert agree / frames > 0.8, agree / frames  # random weights: near-uniform posteriors, yet mostly the same labels


def test_external_data_package_is_served_identically_and_checked(
    conformer: NemoModel, tmp_path: Path, speech_dir: Path
) -> None:
    """``--external-data always`` (what ``auto`` does past 2 GB, as for Parakeet-CTC 0.6B in float32):
    the weights go to one ``model.onnx.data`` beside a small graph, model.json records its size and
    checksum, the export's NeMo check passes through it, the runtime computes exactly what the
    one-file package does, and a truncated or missing weights file is refused at load."""
    import numpy as np

    from service.audio import read_audio
    from service.models import ModelPackage, Recognizer
    from service.package import PackageError
    from tests.conftest import speech_files

    r = export(
        str(conformer.nemo_path), "--name", "ext", "--external-data", "always", "--max-audio-s", "300",
        "--models-dir", str(tmp_path / "m"), "--tokens-dir", str(tmp_path / "t"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    pkg = tmp_path / "m" / "ext"
    manifest = json.loads((pkg / "model.json").read_text())
    ext = manifest["onnx"]["external_data"]
    data = pkg / "model.onnx.data"
    assert ext["file"] == "model.onnx.data" and ext["bytes"] == data.stat().st_size
    assert data.stat().st_mode & 0o777 == (pkg / "model.onnx").stat().st_mode & 0o777  # not onnx's 0600
    assert manifest["onnx"]["max_abs_diff_vs_nemo"] <= 1e-3
    one_file = conformer.model_dir / conformer.name / "model.onnx"
    # The weights (float32, all but the tensors under 1 KiB) are in the data file; what stays in the
    # graph is its structure and the positional table (a Constant node, sized by --max-audio-s).
    assert 0.9 * manifest["parameters"] * 4 <= data.stat().st_size <= manifest["parameters"] * 4
    total = (pkg / "model.onnx").stat().st_size + data.stat().st_size
    assert abs(total - one_file.stat().st_size) < 0.02 * one_file.stat().st_size
    assert manifest.get("nemo_state") is not None  # the NeMo weights index is written from the same graph

    split = Recognizer(ModelPackage.open(tmp_path / "m", tmp_path / "t", "ext"))
    whole = Recognizer(ModelPackage.open(conformer.model_dir, conformer.tokens_dir, conformer.name))
    for f in speech_files(speech_dir)[:3]:
        x = read_audio(f, 16000)[0]
        a, _ = split.logprobs([x])
        b, _ = whole.logprobs([x])
        np.testing.assert_array_equal(a, b)

    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PackageError, match=r"model\.onnx\.data"):
        ModelPackage.open(tmp_path / "m", tmp_path / "t", "ext")
    data.unlink()
    with pytest.raises(PackageError, match="missing"):
        ModelPackage.open(tmp_path / "m", tmp_path / "t", "ext")


def test_local_attention_is_refused_not_exported_wrong(conformer: NemoModel, tmp_path: Path) -> None:
    """NeMo's local attention (``rel_pos_local_attn``, what it switches long-audio FastConformers to)
    exports without an error but computes wrong log-probs at every length (as_strided is traced at the
    example's size): the exporter refuses it by name, with the way out, instead of writing that graph."""
    py = require_export_python()
    local = tmp_path / "local.nemo"
    script = (
        "import sys, logging; logging.getLogger('nemo_logger').setLevel(logging.ERROR)\n"
        "from nemo.collections.asr.models import ASRModel\n"
        "m = ASRModel.restore_from(sys.argv[1], map_location='cpu')\n"
        "m.change_attention_model('rel_pos_local_attn', [16, 16])\n"
        "m.save_to(sys.argv[2])\n"
    )
    subprocess.run(
        [py, "-c", script, str(conformer.nemo_path), str(local)],
        check=True, capture_output=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    r = export(str(local), "--name", "local", "--models-dir", str(tmp_path / "m"), "--tokens-dir", str(tmp_path / "t"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "local attention" in r.stderr and "change_attention_model('rel_pos'" in r.stderr
    assert not (tmp_path / "m" / "local" / "model.onnx").exists()
