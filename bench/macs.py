"""The limit: a model's multiply-accumulates per clip, and this CPU's measured GEMM peak.

    .venv/bin/python -m bench.macs [--threads N]      # prints the peaks and the medium shape's MACs

``model_macs`` counts from ONNX Runtime's own profile of one run on the clip's features: every
MatMul-like node (MatMul, FusedMatMul, Gemm, MatMulInteger, DynamicQuantizeMatMul, ...) as
``prod(output shape) x K`` and every convolution as ``prod(output shape) x (C_in / groups) x
prod(kernel)``, with the shapes the run actually had. Element-wise work (softmax, norms,
activations) is left out: it is a few percent of a Conformer's arithmetic and no GEMM unit runs it.

``gemm_peak`` times one large MatMul graph (M 1024 x K 1024 x N 4096, 4.3 G MACs) through ONNX
Runtime at the runtimes' thread count, float32 and int8 (quantized the way the exporter
quantizes: ``quantize_dynamic``, per channel): the best this CPU does through the same library,
which is what "share of the peak" in ``bench/peers.py`` divides by. The graphs are written once by
the export environment (it has ``onnx``) into ``.cache/bench/gemm``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import CACHE, cpu_info
from service.config import available_cpus
from testkit.nemo import EXPORT_PYTHON, ROOT

GEMM = (1024, 1024, 4096)  # M, K, N
GEMM_DIR = CACHE / "gemm"
MATMUL_OPS = {
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "MatMulNBits",
}
CONV_OPS = {"Conv", "FusedConv", "NhwcConv", "ConvInteger", "QLinearConv"}

_BUILD = """
import sys
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
m, k, n = (int(v) for v in sys.argv[2:5])
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.05, "w")
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
out = sys.argv[1]
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), out + "/float32.onnx")
quantize_dynamic(out + "/float32.onnx", out + "/int8.onnx", weight_type=QuantType.QInt8,
    op_types_to_quantize=["MatMul"], per_channel=True)
"""


def _options(threads: int, profile_dir: str | None = None) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_dir:
        o.enable_profiling = True
        o.profile_file_prefix = str(Path(profile_dir) / "prof")
    return o


def _node_macs(op: str, inputs: list[list[int]], output: list[int]) -> int:
    if op in MATMUL_OPS and inputs and output:
        return math.prod(output) * inputs[0][-1]  # A is [..., M, K] (NeMo's graphs have no transposed Gemm)
    if op in CONV_OPS and len(inputs) >= 2 and output:
        w = inputs[1] if op != "QLinearConv" else inputs[3]
        return math.prod(output) * math.prod(w[1:])
    return 0


def model_macs(onnx_path: Path, feats: np.ndarray, lengths: np.ndarray, threads: int = 1) -> int:
    """Multiply-accumulates of one run of ``onnx_path`` on these features, from ORT's profile."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort.InferenceSession(str(onnx_path), _options(threads, tmp), providers=["CPUExecutionProvider"])
        length_type = np.int32 if sess.get_inputs()[1].type == "tensor(int32)" else np.int64
        sess.run(None, {"audio_signal": feats.astype(np.float32), "length": lengths.astype(length_type)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    total = 0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        shapes = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
        outs = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
        total += _node_macs(str(args.get("op_name", "")), shapes, outs[0] if outs else [])
    return total


def gemm_graphs() -> Path:
    if not (GEMM_DIR / "int8.onnx").exists():
        GEMM_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(EXPORT_PYTHON), "-c", _BUILD, str(GEMM_DIR), *(str(v) for v in GEMM)], check=True, cwd=ROOT)
    return GEMM_DIR


def gemm_peak(threads: int, repeats: int = 15) -> dict[str, float]:
    """This CPU's MAC/s through ONNX Runtime on one large MatMul, float32 and int8 (best of ``repeats``)."""
    d = gemm_graphs()
    m, k, n = GEMM
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    peaks = {}
    for precision in ("float32", "int8"):
        sess = ort.InferenceSession(str(d / f"{precision}.onnx"), _options(threads), providers=["CPUExecutionProvider"])
        sess.run(None, {"x": x})
        times = []
        for _ in range(repeats):
            time.sleep(0.05)
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        # The best run: a peak is what the machine can do, not what it does on average.
        peaks[precision] = m * k * n / min(times)
        peaks[f"{precision}_median"] = m * k * n / statistics.median(times)
    return peaks


def main() -> None:
    from bench.common import medium_model, speech
    from service.models import ModelPackage, Recognizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cpus())
    args = p.parse_args()
    peaks = gemm_peak(args.threads)
    print(f"{cpu_info()}, {args.threads} threads")
    print(
        f"GEMM peak through ONNX Runtime: float32 {peaks['float32'] / 1e9:.1f} G MAC/s, int8 {peaks['int8'] / 1e9:.1f}"
    )
    models, tokens = medium_model()
    rec = Recognizer(ModelPackage.open(models, tokens, "bench_medium_ctc"))
    for seconds in (1, 10, 60):
        feats, lengths = rec.features.batch([speech(seconds, seed=seconds)])
        macs = model_macs(rec.package.onnx_path, feats, lengths)
        print(f"medium shape, {seconds} s: {macs / 1e9:.2f} G MACs ({macs / seconds / 1e9:.2f} G per audio second)")


if __name__ == "__main__":
    main()
