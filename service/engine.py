"""ONNX Runtime: one inference session per model, execution provider choice, thread settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda", "auto"]


def choose_providers(device: Device) -> list[str]:
    """Execution providers for ``device``; falls back to CPU with a warning when CUDA is missing."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        # onnxruntime-gpu[cuda,cudnn] ships CUDA/cuDNN as pip packages; load them before the session.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as e:  # missing pip CUDA libs: the system's may still serve
                log.debug("onnxruntime.preload_dlls failed: %s", e)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning(
            "ASR_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider (install "
            "onnxruntime-gpu on a CUDA host); falling back to CPU"
        )
    return ["CPUExecutionProvider"]


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it per thread arena otherwise).

    Called by the scheduler when its queue runs empty: after a long recording, RSS goes back
    to near idle instead of staying at its peak. A no-op where glibc's malloc_trim is missing.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(n: int = 2) -> None:
    """At most ``n`` glibc heap arenas, unless the operator set MALLOC_ARENA_MAX.

    glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in
    one stays there. The service's threads (event loop, decoding, inference, loading, ORT's) then
    hold memory they no longer use. Measured, 3 rounds of 4 concurrent 10-minute uploads on the
    default model: 176 MB RSS after, 156 MB with 2 arenas; peak 224 against 214 MB. Call it before
    threads start (``service.__main__`` does).
    """
    if "MALLOC_ARENA_MAX" not in os.environ and _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(M_ARENA_MAX, n)


M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
# No automatic trim: the scheduler's idle malloc_trim returns freed memory instead. Measured
# (bench/ort_settings.py, medium shape): with a 128 MB threshold the arena-less server was 10-13 %
# slower again; under sustained load the heap holds at most its working set's high-water mark,
# as ONNX Runtime's arena would, for good.
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_heap_between_runs() -> None:
    """Let glibc reuse freed activation buffers across runs; ``release_memory`` gives them back when idle.

    Without ONNX Runtime's arena (ASR_CPU_MEM_ARENA) each run mallocs its buffers. By default glibc
    maps the big ones from the kernel and returns them (mmap threshold 128 KB, raised only as
    chunks come back), and trims the heap top past 128 KB free: every run page-faults its
    buffers in again. Fixed thresholds (mmap past 32 MB only, no automatic trim) keep them in the
    heap while requests keep coming; the scheduler's idle ``malloc_trim`` returns them.
    Operator settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) win. Measured in README,
    "ONNX Runtime settings".
    """
    if _libc is None or not hasattr(_libc, "mallopt"):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _find_libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_libc = _find_libc()
_malloc_trim = getattr(_libc, "malloc_trim", None)


class Engine:
    """Runs the exported graph: features [B, n_mels, T] + lengths [B] -> log-probs [B, T', V+1].

    An ``ort.InferenceSession`` may be called from several threads; the service still keeps
    concurrent runs to what the cores can serve (see the executor in ``service.app``).
    """

    def __init__(
        self,
        onnx_path: Path | str,
        device: Device = "cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        cpu_mem_arena: bool = False,
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        # The CPU memory arena, off by default: it keeps the largest run's activation buffers for the
        # life of the session, where malloc_trim cannot reach them. Measured through two real
        # servers on the medium shape (bench/ort_settings.py), with the service's glibc settings
        # (keep_freed_heap_between_runs): RSS after idling 523 MB with it against 261 MB without;
        # latency the same (10 s 117 ms either way, 20 s 275 vs 282 ms). Without those glibc
        # settings the arena-less runs page-faulted their buffers in every time (20 s: 1.14x).
        # Weights never come from the arena (use_device_allocator_for_initializers): a big
        # model's would be rounded up into its power-of-two bins.
        opts.enable_cpu_mem_arena = cpu_mem_arena
        opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        requested = choose_providers(device)
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=requested)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != {"audio_signal", "length"}:
            raise ValueError(f"{onnx_path}: expected inputs audio_signal and length, found {sorted(inputs)}")
        self._length_dtype = np.int32 if inputs["length"].type == "tensor(int32)" else np.int64
        self.output_name = self.session.get_outputs()[0].name
        self.providers: list[str] = self.session.get_providers()
        if "CUDAExecutionProvider" in requested and "CUDAExecutionProvider" not in self.providers:
            log.warning("CUDAExecutionProvider could not start (CUDA/cuDNN libraries?); running on CPU")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads

    def run(self, features: npt.NDArray[np.float32], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        out = self.session.run(
            [self.output_name],
            {"audio_signal": features.astype(np.float32, copy=False), "length": lengths.astype(self._length_dtype)},
        )[0]
        return np.asarray(out, dtype=np.float32)
