"""train.py end to end on a tiny espeak-ng corpus: train, checkpoint, average, round, save.

The unit tests in test_training_plan.py cover the pieces; this runs the real thing, because the
pieces passed while the end of a real run crashed (cpu-23: the averaging step validated a model
reloaded without a validation loader, and the run saved nothing after 65 minutes of training).
It trains the real model configuration for a few steps (its WER stays near 100 %: only the
mechanics are checked), then finishes the same run again with --save-only, the path that
recovers a stopped run. NeMo runs in its own environment, as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from tests.conftest import ROOT, SENTENCES, require_export_python, synthesize

TRAIN_VOICES = ["en-us", "en-gb-x-rp", "en+f3"]

# Restores the saved model.nemo and checks what train.py promises about it: its parameters are
# float16 values (kept float32), and they are the chosen checkpoint(s), rounded.
_CHECK_SAVED = """
import json, sys
from pathlib import Path
import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from training.train import average_weights
run = Path(sys.argv[1])
rec = json.loads((run / "averaging.json").read_text())
ckpts = [torch.load(run / "checkpoints" / c, map_location="cpu", weights_only=False)["state_dict"]
         for c in rec["checkpoints"][: rec["chosen_k"]]]
expected = average_weights(ckpts)
model = EncDecCTCModelBPE.restore_from(str(run / "model.nemo"), map_location="cpu")
n = 0
for name, p in model.named_parameters():
    assert p.dtype == torch.float32, name
    assert torch.equal(p.data, p.data.half().float()), f"{name} is not float16-rounded"
    assert torch.equal(p.data, expected[name].half().float()), f"{name} is not the chosen checkpoints' mean"
    n += 1
assert n > 50, n
print("ok", n)
"""

# Two .nemo files hold the same state_dict: every key, dtype and value (read as train.py reads them).
_SAME_STATE = """
import sys, tempfile, torch
from pathlib import Path
from training.train import warm_start
with tempfile.TemporaryDirectory() as tmp:
    a, b = (warm_start(Path(p), Path(tmp) / str(i)) for i, p in enumerate(sys.argv[1:3]))
assert a.keys() == b.keys(), set(a) ^ set(b)
bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
assert not bad, bad
print("same", len(a))
"""

pytestmark = pytest.mark.nemo  # every test here runs export_to_onnx.py or NeMo


def _corpus(root: Path) -> Path:
    root.mkdir()
    rows: dict[str, list[dict[str, object]]] = {"train": [], "val": []}
    for i, text in enumerate(SENTENCES):
        for voice in TRAIN_VOICES:
            wav = synthesize(text, voice, 170, root / f"{i:02d}-{voice.replace('+', '_')}.wav")
            rows["train"].append({"audio_filepath": str(wav), "duration": sf.info(wav).duration, "text": text})
    for i, text in enumerate(SENTENCES[:4]):
        wav = synthesize(text, "en-gb-scotland", 160, root / f"val-{i}.wav")
        rows["val"].append({"audio_filepath": str(wav), "duration": sf.info(wav).duration, "text": text})
    for split, items in rows.items():
        (root / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


def _train(py: str, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [py, "-m", "training.train", "--data", str(data), "--run", str(run), "--epochs", "3"]
    cmd += ["--batch-duration", "20", "--val-every", "3", "--average", "3", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _tail(out: subprocess.CompletedProcess[str]) -> str:
    return (out.stdout + out.stderr)[-4000:]


def test_a_run_trains_averages_and_saves_then_save_only_redoes_it(tmp_path: Path) -> None:
    py = require_export_python()
    data = _corpus(tmp_path / "data")
    run = tmp_path / "run"

    out = _train(py, data, run)
    assert out.returncode == 0, _tail(out)
    ckpts = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(ckpts) == 3, [c.name for c in ckpts]  # --average 3 keeps the 3 best
    rec = json.loads((run / "averaging.json").read_text())
    assert sorted(rec["checkpoints"]) == sorted(c.name for c in ckpts)
    assert set(rec["val_wer"]) == {"1", "2", "3"}
    assert all(0.0 <= w <= 10.0 for w in rec["val_wer"].values())
    assert rec["chosen_k"] in (1, 2, 3)
    assert rec["val_wer"][str(rec["chosen_k"])] == min(rec["val_wer"].values())
    assert isinstance(rec["fp16_rounded"], float)
    assert "validation WER, mean of the best k checkpoints" in out.stdout
    for name in ("model.nemo", "config.yaml"):
        assert (run / name).stat().st_size > 0, name

    check = subprocess.run([py, "-c", _CHECK_SAVED, str(run)], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, _tail(check)
    assert check.stdout.strip().splitlines()[-1].startswith("ok ")

    # A finished run refuses --resume, and --save-only writes its model again from the checkpoints.
    refused = _train(py, data, run, "--resume")
    assert refused.returncode != 0 and "holds a finished run" in refused.stderr, _tail(refused)
    (run / "model.nemo").unlink()
    (run / "averaging.json").unlink()
    again = _train(py, data, run, "--save-only")
    assert again.returncode == 0, _tail(again)
    redo = json.loads((run / "averaging.json").read_text())
    assert redo["checkpoints"] == rec["checkpoints"]
    for k, wer in rec["val_wer"].items():  # the same weights validated again
        assert abs(redo["val_wer"][k] - wer) < 1e-4, (k, redo["val_wer"][k], wer)
    check = subprocess.run([py, "-c", _CHECK_SAVED, str(run)], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, _tail(check)

    # The package export_to_onnx.py makes of this model is where the next run starts
    # (--init-from models/<name>): started from it, a run (--save-only: with nothing trained) saves
    # exactly the state_dict it was exported from, and the tokenizer files NeMo wrote for the run.
    pkg_root = tmp_path / "pkg"
    dirs = ["--models-dir", str(pkg_root / "models"), "--tokens-dir", str(pkg_root / "tokens")]
    exported = subprocess.run(
        [py, "export_to_onnx.py", str(run / "model.nemo"), "--name", "tiny", "--max-audio-s", "20", *dirs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert exported.returncode == 0, _tail(exported)
    pkg = pkg_root / "models" / "tiny"
    meta = json.loads((pkg / "model.json").read_text())
    assert meta["nemo_state"]["in_onnx"] > 50, meta["nemo_state"]  # the weights are read from model.onnx
    run2 = tmp_path / "run2"
    started = _train(py, data, run2, "--init-from", str(pkg), "--tokens-dir", str(pkg_root / "tokens"), "--save-only")
    assert started.returncode == 0, _tail(started)
    for name in ("tokenizer.model", "tokenizer.vocab", "vocab.txt"):
        assert (run2 / "tokenizer" / name).read_bytes() == (run / "tokenizer" / name).read_bytes(), name
    # The NeMo model rebuilt from the package (with the run's config, as run_all.sh ships it) is
    # the exported one: as close to the graph as at export (max_abs_diff_vs_nemo).
    shutil.copy(run / "config.yaml", pkg / "training_config.yaml")
    rebuilt = subprocess.run(
        [py, "-m", "tests.nemo_side.rebuild_from_package", str(pkg), str(pkg_root / "tokens")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rebuilt.returncode == 0, _tail(rebuilt)
    diff = float(rebuilt.stdout.strip().splitlines()[-1].split()[-1])
    assert diff <= max(1e-4, 2 * meta["onnx"]["max_abs_diff_vs_nemo"]), (diff, meta["onnx"])
    same = subprocess.run(
        [py, "-c", _SAME_STATE, str(run / "model.nemo"), str(run2 / "model.nemo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert same.returncode == 0, _tail(same)
    assert same.stdout.strip().splitlines()[-1].startswith("same ")
