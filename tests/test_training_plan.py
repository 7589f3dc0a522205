"""train.py's plan: its steps, its fit to a time budget, and the corpora it trains on.

Every run must end on a validation, or its last steps are never saved.

Lightning checkpoints only after a validation (cpu-7 lost its last 238 steps that way), so the
plan must be a whole number of validation intervals, no interval longer than asked for, and
no longer than needed. Training itself never runs in CI; this checks the arithmetic it uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from training.train import best_checkpoints, finished_run, time_plan, training_manifest, validation_plan


@pytest.mark.parametrize("planned", [1, 7, 100, 249, 250, 251, 2238, 2736, 6080])
@pytest.mark.parametrize("val_every", [0, 1, 10, 250, 500, 560, 10_000])
def test_plan_ends_on_a_validation(planned: int, val_every: int) -> None:
    interval, max_steps = validation_plan(planned, val_every)
    validations = max_steps // interval
    assert max_steps % interval == 0  # the last step is a validation step
    assert 1 <= interval <= max(1, val_every)  # never validates less often than asked
    assert planned <= max_steps < planned + validations  # grows by fewer steps than validations
    assert validations == -(-planned // max(1, val_every))  # no more validations than asked for


def test_plan_already_on_a_validation_is_kept() -> None:
    assert validation_plan(2000, 500) == (500, 2000)


def test_time_plan_fills_the_time_left() -> None:
    # 100 steps in 200 s (2 s a step); validations of 30 s every 50 steps; an hour left.
    end = time_plan(step=100, steps_timed=100, train_s=200.0, val_s=30.0, left_s=3600.0, val_every=50, cap=10_000)

    def cost(end: int) -> float:  # validations at steps 150, 200, ... and at the end if it is not one
        validations = len(range(150, end + 1, 50)) + (1 if end % 50 else 0)
        return (end - 100) * 2.0 + validations * 30.0

    assert cost(end) <= 3600.0  # it fits
    assert cost(end + 1) > 3600.0  # and no longer plan would


@pytest.mark.parametrize("rate", [0.3, 0.7, 1.3, 3.0])
def test_time_plan_follows_the_measured_rate(rate: float) -> None:
    # cpu-18's failure: a plan sized for 1.3 steps/s on a 0.7 steps/s machine. The plan is the
    # measured rate times the time left (validations aside), whatever the rate.
    end = time_plan(step=40, steps_timed=40, train_s=40 / rate, val_s=0.0, left_s=4500.0, val_every=250, cap=10**6)
    assert abs((end - 40) - 4500 * rate) <= 1


def test_time_plan_stays_within_cap_and_never_goes_back() -> None:
    assert time_plan(step=10, steps_timed=10, train_s=1.0, val_s=1.0, left_s=1e6, val_every=100, cap=500) == 500
    # the budget is spent already: end now
    assert time_plan(step=900, steps_timed=900, train_s=900.0, val_s=60.0, left_s=-5.0, val_every=100, cap=5000) == 900


def _corpus(root: Path, name: str, texts: list[str], newline_at_end: bool = True) -> Path:
    d = root / name
    d.mkdir()
    lines = [
        json.dumps({"audio_filepath": str(d / f"{i}.wav"), "duration": 1.0, "text": t}) for i, t in enumerate(texts)
    ]
    (d / "train.json").write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return d


def test_one_corpus_is_used_as_it_is(tmp_path: Path) -> None:
    a = _corpus(tmp_path, "a", ["one", "two"])
    assert training_manifest([a], tmp_path / "run") == a / "train.json"


def test_several_corpora_are_joined_in_order(tmp_path: Path) -> None:
    # the second corpus's manifest lacks its final newline: its last line must not run into the next
    a = _corpus(tmp_path, "a", ["one", "two"])
    b = _corpus(tmp_path, "b", ["three"], newline_at_end=False)
    c = _corpus(tmp_path, "c", ["four", "five"])
    run = tmp_path / "run"
    run.mkdir()
    out = training_manifest([a, b, c], run)
    assert out.parent == run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["one", "two", "three", "four", "five"]
    assert [Path(r["audio_filepath"]).parent.name for r in rows] == ["a", "a", "b", "c", "c"]


def _run_dir(tmp_path: Path, *, nemo_after_ckpt: bool | None) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    os.utime(run / "checkpoints" / "last.ckpt", (1000, 1000))
    if nemo_after_ckpt is not None:
        (run / "model.nemo").write_bytes(b"nemo")
        t = 2000 if nemo_after_ckpt else 500
        os.utime(run / "model.nemo", (t, t))
    return run


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    # model.nemo saved after the last checkpoint: the run ended; resuming it would train nothing
    run = _run_dir(tmp_path, nemo_after_ckpt=True)
    why = finished_run(run)
    assert why is not None and str(run) in why and "mv " in why


@pytest.mark.parametrize("nemo_after_ckpt", [None, False])
def test_an_interrupted_run_resumes(tmp_path: Path, nemo_after_ckpt: bool | None) -> None:
    # no model.nemo yet, or one older than the checkpoint (training went on after a --save-only)
    assert finished_run(_run_dir(tmp_path, nemo_after_ckpt=nemo_after_ckpt)) is None


def test_a_new_run_directory_is_fine(tmp_path: Path) -> None:
    assert finished_run(tmp_path / "nothing-here") is None


_REUSE_PROBE = """
import ctypes, resource, sys
import numpy as np
from training.train import keep_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: count 4 KiB pages, as without huge pages
if sys.argv[1] == "keep":
    assert keep_freed_memory()
n = 64 << 20
a = np.ones(n, np.uint8)  # allocate, touch every page, free: a 64 MiB activation of one step
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(n, np.uint8)  # the next step's
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_reallocating(mode: str) -> int:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux (glibc) only")
def test_keep_freed_memory_reuses_a_freed_block() -> None:
    # glibc's default gives a freed 64 MiB block back to the kernel, and the next allocation
    # faults all its 16 384 pages in again (training: ~274 000 a step); kept, it faults almost none.
    pages = (64 << 20) // 4096
    assert _faults_reallocating("default") > pages // 2
    assert _faults_reallocating("keep") < pages // 20


def test_best_checkpoints_rank_by_validation_wer(tmp_path: Path) -> None:
    # ModelCheckpoint's names (filename="best-{step}-{val_wer:.3f}"); last.ckpt is not a candidate
    for name in [
        "best-step=246-val_wer=0.202",
        "best-step=1230-val_wer=0.183",
        "best-step=1599-val_wer=0.184",
        "best-step=1476-val_wer=0.189",
        "best-step=984-val_wer=0.183",
        "last",
    ]:
        (tmp_path / f"{name}.ckpt").write_bytes(b"")
    ranked = [p.name for p in best_checkpoints(tmp_path, 3)]
    # the lowest WER first; of two equal (rounded) scores, the later step
    assert ranked == [
        "best-step=1230-val_wer=0.183.ckpt",
        "best-step=984-val_wer=0.183.ckpt",
        "best-step=1599-val_wer=0.184.ckpt",
    ]
    assert len(best_checkpoints(tmp_path, 10)) == 5
    assert best_checkpoints(tmp_path / "none", 3) == []


_AVERAGE_PROBE = """
import torch
from training.train import average_weights
g = torch.Generator().manual_seed(0)
sds = [{"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).half(),
        "n": torch.tensor(i + 7)} for i in range(3)]
avg = average_weights(sds)
assert torch.allclose(avg["w"], torch.stack([sd["w"] for sd in sds]).mean(0), atol=1e-6)
assert avg["h"].dtype == torch.float16
assert torch.allclose(avg["h"].float(), torch.stack([sd["h"].float() for sd in sds]).mean(0), atol=1e-3)
assert avg["n"].item() == 7 and avg["n"].dtype == sds[0]["n"].dtype  # counters: the first (best) one's
assert torch.equal(average_weights(sds[:1])["w"], sds[0]["w"])
try:
    average_weights([sds[0], {"w": sds[1]["w"]}])
except ValueError:
    print("ok")
"""


@pytest.mark.nemo
def test_average_weights_is_the_mean_of_the_checkpoints() -> None:
    import subprocess

    from tests.conftest import ROOT, require_export_python

    out = subprocess.run([require_export_python(), "-c", _AVERAGE_PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


_ROUND_PROBE = """
import torch
from training.train import round_to_fp16
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
m.register_buffer("fb", torch.randn(4, 4))  # a buffer (the preprocessor's filterbank) stays as it is
m[1].running_mean.copy_(torch.randn(8))
with torch.no_grad():
    for p in m.parameters():  # BatchNorm starts at ones and zeros, which float16 holds exactly
        p.copy_(torch.randn_like(p))
    m[2].bias.copy_(torch.tensor([1e6, 0.1]))  # beyond float16's range: that parameter is left alone
before = {k: v.clone() for k, v in m.state_dict().items()}
params = {k for k, _ in m.named_parameters()}
assert round_to_fp16(m) == len(params) - 1
after = m.state_dict()
for k, v in after.items():
    assert v.dtype == before[k].dtype
    if k in params and k != "2.bias":
        assert torch.equal(v, before[k].half().float()), k
        assert not torch.equal(v, before[k]), k  # random weights are rarely float16 values already
    else:
        assert torch.equal(v, before[k]), k
print("ok")
"""


@pytest.mark.nemo
def test_round_to_fp16_rounds_parameters_only() -> None:
    import subprocess

    from tests.conftest import ROOT, require_export_python

    out = subprocess.run([require_export_python(), "-c", _ROUND_PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
