"""Where the NeMo side runs: its own virtual environment, as a subprocess (the runtime's process
never imports torch or NeMo)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
EXPORT_PYTHON = Path(os.environ.get("ASR_EXPORT_PYTHON", ROOT / ".venv-export" / "bin" / "python"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
