#!/usr/bin/env bash
# The vLLM tests (tests_vllm/): builds .venv-vllm (scripts/setup_vllm.sh) and runs them there.
# Usage: bash scripts/test_vllm.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv-vllm/bin/python -m pytest -q tests_vllm "$@"
