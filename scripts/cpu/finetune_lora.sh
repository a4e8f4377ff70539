#!/usr/bin/env bash
# CPU twin of scripts/finetune_lora.sh: the same one-device command on one CPU process, with the tiny Llama
# preset and the shipped instruction data, 3 steps. (A second process would make it data parallel, which the
# seed's row is not; DEVICES="--nproc_per_node 2" does exactly that if wanted.)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/paddle_llm_twins}
export MODEL=${MODEL:-tiny-llama} DATASET=${DATASET:-paddle_llm/assets/instructions} OUTPUT_DIR=${OUTPUT_DIR:-$WORK/finetune_lora}
export DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec bash scripts/finetune_lora.sh --max_steps 3 --gradient_accumulation_steps 2 --src_length 48 --max_length 64 \
    --logging_steps 1 --eval_iters 2 --report_to none "$@"
