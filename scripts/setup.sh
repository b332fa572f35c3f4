#!/usr/bin/env bash
# Installs everything pyquant needs into ./.venv and builds the C++ extension in place.
# Idempotent: a second run only re-checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing pinned packages (requirements.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
echo "[setup] building the pyquant extension (pip install --no-build-isolation -e .)"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, pyquant, pyquant._C; print('[setup] ok: torch', torch.__version__, '| backends', pyquant.kernels.available_backends())"
