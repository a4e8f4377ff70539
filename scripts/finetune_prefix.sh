#!/usr/bin/env bash
# Seed row 4 - prefix tuning on one GPU (64 prefix tokens), fp16 O2, recompute.
#
#   MODEL=/models/llama-7b DATASET=data/sft bash scripts/finetune_prefix.sh [--flag value ...]
#
# DATASET holds train.json and dev.json. Flags given after the script override the ones below.
# More GPUs or machines: set DEVICES (e.g. DEVICES="--gpus 0,1,2,3") and, across machines,
# NNODES=2 MASTER=10.0.0.1:8090 NODE_RANK=0|1. Prefix tuning does not run with pipeline parallel.
# CPU twin, run by tests/integration/test_launch_scripts.py: scripts/cpu/finetune_prefix.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model directory (paddle_llm never downloads)}"
: "${DATASET:?set DATASET to a directory holding train.json and dev.json}"
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llama_prefix}
NODES=${MASTER:+--master $MASTER --nnodes ${NNODES:-2} --rank ${NODE_RANK:-0}}
# One device needs no launcher, exactly as the seed's command; DEVICES or MASTER bring it in.
LAUNCH=${DEVICES:+-m paddle.distributed.launch $DEVICES $NODES --log_dir $OUTPUT_DIR/log_node${NODE_RANK:-0}}

# shellcheck disable=SC2086  # LAUNCH is a list of launcher flags
${PYTHON:-python} -u $LAUNCH finetune_generation.py \
    --model_name_or_path "$MODEL" \
    --dataset_name_or_path "$DATASET" \
    --do_train \
    --do_eval \
    --num_train_epochs 2 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --overwrite_output_dir \
    --output_dir "$OUTPUT_DIR" \
    --logging_steps 10 \
    --fp16 \
    --fp16_opt_level O2 \
    --gradient_accumulation_steps 4 \
    --recompute \
    --learning_rate 3e-2 \
    --lr_scheduler_type linear \
    --max_grad_norm 1.0 \
    --warmup_steps 20 \
    --prefix_tuning True \
    --num_prefix_tokens 64 \
    --device "${DEVICE:-gpu}" \
    "$@"
