#!/usr/bin/env bash
# Zero-shot GSM8K evaluation (greedy, the training prompt) of a model or a run; see grpo_ds/eval.py.
#
#   bash scripts/eval_gsm8k.sh MODEL [--data FILE] [--limit N] [--max_new_tokens N] [--output_dir DIR] ...
#   bash scripts/eval_gsm8k.sh MODEL --nproc N ...          # N ranks (GPUs, or CPU processes), results gathered
#   bash scripts/eval_gsm8k.sh --score_gold --data FILE     # the dataset's own solutions, scored as completions
#
# MODEL: a hub id, a Hugging Face folder (a run's final/), a run's output folder, a DeepSpeed checkpoint, a .gguf
# file or 'embedded'. Every other flag is passed on; `--help` lists them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="python3"

nproc=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) [ $# -ge 2 ] || { echo "error: --nproc needs a number" >&2; exit 2; }; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#--nproc=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nproc '$nproc': expected a positive integer" >&2
  exit 2
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ "$nproc" -eq 1 ]; then
  exec "$python" "$root/scripts/eval.py" "${args[@]}"
fi
# torch's launcher starts the ranks (GPUs when present, gloo CPU processes otherwise) on a free local port.
exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$root/scripts/eval.py" "${args[@]}"
