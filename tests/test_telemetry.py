"""ONNX Runtime's usage telemetry stays off in the service unless an operator turns it on.

ONNX Runtime 1.32's Linux wheels report to Microsoft and persist a device ID under
``~/.cache/Microsoft/DeveloperTools/.onnxruntime``; the service sets ``ORT_DISABLE_TELEMETRY=1``
before ONNX Runtime initialises. The device-ID file is the observable trace of telemetry being
on, so the control run (the operator's explicit ``ORT_DISABLE_TELEMETRY=0``) must create it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import service.engine, onnxruntime as ort, glob; "
    "ort.InferenceSession(glob.glob('models/*/model.onnx')[0], providers=['CPUExecutionProvider'])"
)


# ONNX Runtime stays quiet on CI machines that announce themselves (its binary checks these
# variables), so the probe runs without them: as on a user's server.
CI_VARIABLES = (
    "CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
)  # fmt: skip


def run_probe(home: Path, **env: str) -> Path:
    dropped = {"XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY", *CI_VARIABLES}
    e = {k: v for k, v in os.environ.items() if k not in dropped}
    subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**e, "HOME": str(home), **env}, check=True)
    return home / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime"


def test_service_disables_onnxruntime_telemetry(tmp_path: Path) -> None:
    assert not run_probe(tmp_path / "default").exists()


def test_operator_can_turn_it_back_on(tmp_path: Path) -> None:
    trace = run_probe(tmp_path / "opted_in", ORT_DISABLE_TELEMETRY="0")
    if not trace.exists():
        pytest.fail("ONNX Runtime wrote no device ID with telemetry on: this check no longer observes it")
