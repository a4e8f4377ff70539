#!/usr/bin/env bash
# Seed row 5 - full fine-tuning with pipeline parallel: 4 GPUs as tensor parallel 2 x pipeline parallel 2,
# 16 micro-batches of 1 per step.
#
#   MODEL=/models/llama-7b DATASET=data/sft bash scripts/finetune_pipeline_tp2_pp2.sh [--flag value ...]
#
# DATASET holds train.json and dev.json. Flags given after the script override the ones below. Adds
# --unified_checkpoint 1 to the seed's flags, so checkpoints and adapters load under any layout.
# Generation-based evaluation and prefix tuning do not run with pipeline parallel (paddle-llm check says so).
# Several machines: NNODES=2 MASTER=10.0.0.1:8090 NODE_RANK=0|1 (the second machine adds data-parallel replicas).
# CPU twin, run by tests/integration/test_launch_scripts.py: scripts/cpu/finetune_pipeline_tp2_pp2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model directory (paddle_llm never downloads)}"
: "${DATASET:?set DATASET to a directory holding train.json and dev.json}"
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/llama_tp2_pp2}
DEVICES=${DEVICES:---gpus 4,5,6,7}
NODES=${MASTER:+--master $MASTER --nnodes ${NNODES:-2} --rank ${NODE_RANK:-0}}

# shellcheck disable=SC2086  # DEVICES and NODES are lists of launcher flags
${PYTHON:-python} -u -m paddle.distributed.launch $DEVICES $NODES --log_dir "$OUTPUT_DIR/log_node${NODE_RANK:-0}" \
    finetune_generation.py \
    --model_name_or_path "$MODEL" \
    --dataset_name_or_path "$DATASET" \
    --do_train \
    --do_eval \
    --num_train_epochs 1 \
    --dataloader_num_workers 1 \
    --gradient_accumulation_steps 16 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 16 \
    --tensor_parallel_degree "${TP:-2}" \
    --pipeline_parallel_degree "${PP:-2}" \
    --pipeline_parallel_config disable_p2p_cache_shape \
    --overwrite_output_dir \
    --output_dir "$OUTPUT_DIR" \
    --logging_steps 1 \
    --disable_tqdm 1 \
    --eval_steps 100 \
    --eval_with_do_generation 0 \
    --fp16 0 \
    --fp16_opt_level O2 \
    --recompute 0 \
    --learning_rate 3e-5 \
    --lr_scheduler_type linear \
    --max_grad_norm 1.0 \
    --warmup_steps 20 \
    --unified_checkpoint 1 \
    --device "${DEVICE:-gpu}" \
    "$@"
