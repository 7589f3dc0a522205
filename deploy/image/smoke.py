"""Build-time check that the trimmed runtime still serves: every bundled package transcribes.

Runs in the image's build stage on the same trimmed ``/opt/venv`` the final stage copies: loads
each package under ``models/`` through the service's own ``Recognizer`` (numpy features, ONNX
Runtime, the package's decoder with its LM) and transcribes one second of noise. A library the
trimming broke fails here, at build time, not at a user's first request.
"""

from __future__ import annotations

import numpy as np

from service.config import Settings
from service.models import ModelPackage, Recognizer


def main() -> None:
    s = Settings()
    names = sorted(p.parent.name for p in s.model_dir.glob("*/model.json"))
    assert names, f"no model package under {s.model_dir}"
    noise = np.random.default_rng(0).normal(0, 0.05, 16000).astype(np.float32)
    for name in names:
        rec = Recognizer(ModelPackage.open(s.model_dir, s.tokens_dir, name))
        (out,) = rec.transcribe([noise[: rec.sample_rate]])
        print(f"smoke: {name} transcribed 1 s of noise as {out.text!r}")


if __name__ == "__main__":
    main()
