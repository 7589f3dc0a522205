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
        cpu_mem_arena: bool = True,
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        # The CPU memory arena, on: it keeps activation buffers between runs; without it each run
        # mallocs them afresh and page-faults them in (glibc maps large ones from the kernel and
        # back). It would keep the largest run's buffers for good, so the scheduler shrinks it when
        # idle (``shrink``). Measured through two real servers on the medium shape
        # (bench/ort_settings.py): without the arena 10 s ran 1.19x and 20 s 1.17x slower; RSS
        # under load 531 MB with it against 307 MB, after idling 293 against 262 MB.
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
        self.cpu_mem_arena = cpu_mem_arena
        self.output_name = self.session.get_outputs()[0].name
        self.providers: list[str] = self.session.get_providers()
        if "CUDAExecutionProvider" in requested and "CUDAExecutionProvider" not in self.providers:
            log.warning("CUDAExecutionProvider could not start (CUDA/cuDNN libraries?); running on CPU")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads

    def shrink(self, n_mels: int) -> None:
        """Hand the memory arena's spare chunks back to the OS (no-op without the arena).

        ONNX Runtime frees them only at the end of a run that asks for it, so this is a run on
        16 frames of silence (``n_mels`` features each) with ``memory.enable_memory_arena_shrinkage``;
        the scheduler calls it when its queue has been empty a while (with ``release_memory``).
        """
        if not self.cpu_mem_arena:
            return
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        feats = np.zeros((1, n_mels, 16), dtype=np.float32)
        self.session.run([self.output_name], {"audio_signal": feats, "length": np.array([16], self._length_dtype)}, ro)

    def run(self, features: npt.NDArray[np.float32], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        out = self.session.run(
            [self.output_name],
            {"audio_signal": features.astype(np.float32, copy=False), "length": lengths.astype(self._length_dtype)},
        )[0]
        return np.asarray(out, dtype=np.float32)
