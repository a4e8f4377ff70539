#!/usr/bin/env bash
# Seed row 2 - full-parameter fine-tuning: Llama over 4 GPUs with tensor parallel 4, fp16 O2, recompute.
#
#   MODEL=/models/llama-7b DATASET=data/sft bash scripts/finetune_full_tp4.sh [--flag value ...]
#
# DATASET holds train.json and dev.json. Flags given after the script override the ones below. Adds
# --unified_checkpoint 1 to the seed's flags, so checkpoints and adapters load under any layout.
# Several machines: NNODES=2 MASTER=10.0.0.1:8090 NODE_RANK=0|1 (tensor parallel stays inside a machine; the
# second machine adds data-parallel replicas).
# CPU twin, run by tests/integration/test_launch_scripts.py: scripts/cpu/finetune_full_tp4.sh (TP=2, 2 processes)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model directory (paddle_llm never downloads)}"
: "${DATASET:?set DATASET to a directory holding train.json and dev.json}"
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llama_full_tp4}
DEVICES=${DEVICES:---gpus 0,1,2,3}
NODES=${MASTER:+--master $MASTER --nnodes ${NNODES:-2} --rank ${NODE_RANK:-0}}

# shellcheck disable=SC2086  # DEVICES and NODES are lists of launcher flags
${PYTHON:-python} -u -m paddle.distributed.launch $DEVICES $NODES --log_dir "$OUTPUT_DIR/log_node${NODE_RANK:-0}" \
    finetune_generation.py \
    --model_name_or_path "$MODEL" \
    --dataset_name_or_path "$DATASET" \
    --do_train \
    --do_eval \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --tensor_parallel_degree "${TP:-4}" \
    --overwrite_output_dir \
    --output_dir "$OUTPUT_DIR" \
    --logging_steps 10 \
    --fp16 \
    --fp16_opt_level O2 \
    --gradient_accumulation_steps 32 \
    --recompute \
    --learning_rate 3e-5 \
    --lr_scheduler_type linear \
    --max_grad_norm 1.0 \
    --warmup_steps 20 \
    --unified_checkpoint 1 \
    --device "${DEVICE:-gpu}" \
    "$@"
