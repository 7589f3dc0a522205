#!/usr/bin/env bash
# Install everything the test suite needs, then run lint, format check, type check and pytest.
#
#   bash tests/run.sh [pytest args...]          the full tier: everything (CI runs this)
#   bash tests/run.sh --fast [pytest args...]   the fast tier: no NeMo environment, no NeMo tests
#
# Creates two virtual environments in the project root (both git-ignored):
#   .venv         the runtime (requirements.txt) plus test tools (requirements-dev.txt): no torch, no NeMo
#   .venv-export  NeMo + torch (CPU) for export_to_onnx.py and the NeMo side of the parity tests
# and installs espeak-ng and sox (test audio), chromium with its driver (the /live page test, in a
# real headless browser), irstlm (an independent n-gram estimator that tests/test_ngram_lm.py
# checks training/ngram.py against) and haproxy (tests/test_scale_out.py runs the Compose set-up's
# load balancer config for real) with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TIER=full
if [ "${1:-}" = "--fast" ]; then TIER=fast; shift; fi

if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! command -v chromium >/dev/null \
  || ! command -v chromedriver >/dev/null || [ ! -x /usr/lib/irstlm/bin/tlm ] || ! command -v haproxy >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends espeak-ng sox \
    chromium chromium-driver irstlm haproxy
fi

# pip, with the noise of this machine's missing local index folders filtered out (errors still show).
pipq() {
  local log; log=$(mktemp)
  if ! "$@" -q --disable-pip-version-check >"$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq .venv/bin/python -m pip install -r requirements-dev.txt

if [ "$TIER" = full ]; then
  if [ ! -x .venv-export/bin/python ]; then
    "$PY" -m venv .venv-export
  fi
  if ! .venv-export/bin/python -c "import nemo.collections.asr" >/dev/null 2>&1; then
    # torch first and pinned: the CPU wheel. Letting pip pick torch for NeMo would pull CUDA builds.
    pipq .venv-export/bin/python -m pip install torch==2.13.0
    pipq .venv-export/bin/python -m pip install -r requirements-export.txt
  fi
fi

echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest ($TIER tier)"
# pytest exits 5 when it collects no tests; set -e turns that (like any failure) into a failed run.
if [ "$TIER" = fast ]; then
  # ASR_TEST_TIER=fast: a test that reaches for NeMo without its `nemo` mark fails instead of skipping.
  ASR_TEST_TIER=fast .venv/bin/python -m pytest -m "not nemo" "$@"
else
  ASR_EXPORT_PYTHON="$PWD/.venv-export/bin/python" .venv/bin/python -m pytest "$@"
fi
