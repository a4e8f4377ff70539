#!/usr/bin/env bash
# CPU twin of scripts/finetune_full_tp4.sh: the same command as tensor parallel 2 on 2 CPU processes, with the
# tiny Llama preset (4 heads, so TP=4 on 4 processes works too) and the shipped instruction data, 3 steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/paddle_llm_twins}
export MODEL=${MODEL:-tiny-llama} DATASET=${DATASET:-paddle_llm/assets/instructions} OUTPUT_DIR=${OUTPUT_DIR:-$WORK/finetune_full_tp4}
export TP=${TP:-2} DEVICES=${DEVICES:---nproc_per_node ${TP:-2}} DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec bash scripts/finetune_full_tp4.sh --max_steps 3 --gradient_accumulation_steps 2 --src_length 48 --max_length 64 \
    --logging_steps 1 --eval_iters 2 --report_to none "$@"
