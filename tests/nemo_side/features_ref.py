"""NeMo's preprocessor under many configurations, and the runtime parameters the export reads.

For each preprocessor config (AudioToMelSpectrogramPreprocessor kwargs) it builds NeMo's own
module in eval mode, featurizes each audio file, and records what export_to_onnx.py's
feature_params() reads from it. The runtime test then builds its FeatureExtractor from those
parameters and compares features. Runs in the export venv.

Usage: python -m tests.nemo_side.features_ref --configs CONFIGS.json --out OUT.npz FILE.wav ...
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)

    import soundfile as sf
    import torch
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor
    from omegaconf import OmegaConf

    from export_to_onnx import feature_params, nemo_framing

    configs = json.loads(args.configs.read_text())
    arrays: dict[str, np.ndarray] = {}
    params = []
    signals = [sf.read(str(f), dtype="float32")[0] for f in args.files]
    for c, cfg in enumerate(configs):
        pre = AudioToMelSpectrogramPreprocessor(**cfg, dither=0.0, pad_to=0)
        pre.eval()
        fake_model = SimpleNamespace(preprocessor=pre, cfg=SimpleNamespace(preprocessor=OmegaConf.create(cfg)))
        params.append(feature_params(fake_model, nemo_framing()))
        with torch.no_grad():
            for i, x in enumerate(signals):
                f, n = pre(input_signal=torch.from_numpy(x)[None], length=torch.tensor([x.shape[0]]))
                arrays[f"c{c}_f{i}"] = f[0, :, : int(n[0])].numpy()
    np.savez(args.out, **arrays)
    args.out.with_suffix(".json").write_text(json.dumps(params, indent=1))


if __name__ == "__main__":
    main()
