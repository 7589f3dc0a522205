"""Rebuild a package's NeMo model from the package alone and compare it with the package's graph.

Usage: python -m tests.nemo_side.rebuild_from_package PKG_DIR TOKENS_DIR  (runs in the export venv)

The model comes from training.train.nemo_model_from_package, the way train.py --init-from starts
from a package; NeMo's forward is compared with model.onnx by export_to_onnx.verify (the export's
own check). Prints ``max_abs_diff D``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from export_to_onnx import ctc_parts, subsampling_params, verify
from training.train import nemo_model_from_package

pkg = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    model = nemo_model_from_package(pkg, Path(tmp), Path(sys.argv[2]))
    decoder, _ = ctc_parts(model)
    print("max_abs_diff", verify(model, decoder, pkg / "model.onnx", subsampling_params(model)))
