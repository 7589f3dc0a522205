"""``pip install .`` gives an importable service and its console command, without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from testkit.nemo import ROOT


def test_wheel_installs_an_importable_service_and_its_command(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("nemo_ctc_asr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        requires = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {"service/app.py", "service/routes/native.py", "service/package.py", "service/live/live.html"} <= names
    assert not any(n.startswith(("tests/", "bench/", "training/", "models/")) for n in names)
    assert "nemo-ctc-asr = service.__main__:main" in entry_points
    deps = [line.split(":", 1)[1].strip() for line in requires.splitlines() if line.startswith("Requires-Dist:")]
    assert any(d.startswith("onnxruntime") for d in deps) and not any(d.startswith(("torch", "nemo")) for d in deps)
    # Installed apart from the checkout (dependencies from this environment), run from elsewhere.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import service.app, service.routes.openai, sys; print(service.app.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(str(site)), out.stderr
    help_ = subprocess.run(
        [str(site / "bin" / "nemo-ctc-asr"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "ASR_" in help_.stdout, help_.stderr


def test_pinned_requirements_and_package_dependencies_name_the_same_packages() -> None:
    """requirements.txt (the pinned set the README, Docker and CI install) and pyproject's ranges
    (``pip install .``) must not drift apart: a dependency added to one only breaks the other."""
    import re
    import tomllib

    def name(spec: str) -> str:
        return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")

    pinned = {
        name(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    ranged = {name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert pinned == ranged
