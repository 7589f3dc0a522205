"""Round a .nemo model's parameters to float16 values, as training/train.py does before it saves.

Usage: python -m tests.nemo_side.round_fp16 IN.nemo OUT.nemo  (runs in the export venv)
"""

from __future__ import annotations

import sys

from nemo.collections.asr.models import ASRModel

from training.train import round_to_fp16

model = ASRModel.restore_from(sys.argv[1], map_location="cpu")
n = round_to_fp16(model)
model.save_to(sys.argv[2])
print(f"rounded {n} parameters")
