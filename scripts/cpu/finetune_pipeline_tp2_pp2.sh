#!/usr/bin/env bash
# CPU twin of scripts/finetune_pipeline_tp2_pp2.sh: the same command as pipeline parallel 2 on 2 CPU processes
# (TP=2 DEVICES="--nproc_per_node 4" runs the full tensor 2 x pipeline 2 layout), with the tiny Llama preset
# and the shipped instruction data, 3 steps of 2 micro-batches.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/paddle_llm_twins}
export MODEL=${MODEL:-tiny-llama} DATASET=${DATASET:-paddle_llm/assets/instructions} OUTPUT_DIR=${OUTPUT_DIR:-$WORK/finetune_pipeline_tp2_pp2}
export TP=${TP:-1} PP=${PP:-2} DEVICES=${DEVICES:---nproc_per_node 2} DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec bash scripts/finetune_pipeline_tp2_pp2.sh --max_steps 3 --gradient_accumulation_steps 2 --src_length 48 --max_length 64 \
    --eval_iters 2 --report_to none "$@"
