"""Execution providers and threads, on this (CPU-only) onnxruntime."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from service.config import Settings, available_cpus
from service.engine import Engine, choose_providers
from tests.conftest import NemoModel


def onnx_path(m: NemoModel) -> str:
    return str(m.model_dir / m.name / "model.onnx")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is installed")
def test_cuda_request_falls_back_to_cpu_with_warning(conformer: NemoModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        e = Engine(onnx_path(conformer), device="cuda")
    assert e.providers == ["CPUExecutionProvider"]
    assert any("falling back to CPU" in r.message for r in caplog.records)


def test_cpu_and_auto_on_a_cpu_build(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with caplog.at_level(logging.WARNING, logger="service.engine"):
            assert choose_providers("auto") == ["CPUExecutionProvider"]
        assert not caplog.records  # auto quietly uses what exists


def test_thread_settings_reach_the_session(conformer: NemoModel) -> None:
    e = Engine(onnx_path(conformer), intra_op_threads=1, inter_op_threads=1)
    assert e.session.get_session_options().intra_op_num_threads == 1
    assert e.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_default_threads_follow_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASR_INTRA_OP_THREADS", raising=False)
    assert Settings().resolved_intra_op_threads() == available_cpus() >= 1
    monkeypatch.setenv("ASR_INTRA_OP_THREADS", "3")
    assert Settings().resolved_intra_op_threads() == 3


def test_memory_arena_setting_reaches_the_engine_and_keeps_results(
    conformer: NemoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASR_CPU_MEM_ARENA reaches the engine (on by default, shrunk when idle) and computes the same log-probs."""
    import numpy as np

    onnx_path = conformer.model_dir / conformer.name / "model.onnx"
    monkeypatch.setenv("ASR_CPU_MEM_ARENA", "false")
    assert Settings().cpu_mem_arena is False
    monkeypatch.delenv("ASR_CPU_MEM_ARENA")
    assert Settings().cpu_mem_arena is True
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1, 80, 400)).astype(np.float32)
    lengths = np.array([400])
    on, off = Engine(onnx_path), Engine(onnx_path, cpu_mem_arena=False)
    assert on.session.get_session_options().enable_cpu_mem_arena
    assert not off.session.get_session_options().enable_cpu_mem_arena
    np.testing.assert_array_equal(on.run(feats, lengths), off.run(feats, lengths))
    on.shrink(80)  # the idle shrink is a run with ORT's shrinkage option: it must not disturb the next
    off.shrink(80)
    np.testing.assert_array_equal(on.run(feats, lengths), off.run(feats, lengths))
