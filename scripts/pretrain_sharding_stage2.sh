#!/usr/bin/env bash
# Seed row 1 - pretraining: Llama on the 8 GPUs of one machine, sharding stage 2 (ZeRO-2), fp16 O2.
#
#   MODEL=/models/llama-7b INPUT_DIR=data/corpus bash scripts/pretrain_sharding_stage2.sh [--flag value ...]
#
# Adds --unified_checkpoint 1 to the seed's flags, so a checkpoint resumes under any layout. Flags given after
# the script override the ones below (the last occurrence wins). Check a layout before
# launching it: `paddle-llm check --gpus 0,1,2,3,4,5,6,7 run_pretrain.py ...`.
# Several machines (2 x 8 GPUs = 16 sharding ranks): run the same command on every machine with
#   NNODES=2 MASTER=10.0.0.1:8090 NODE_RANK=0      (NODE_RANK=1 on the second machine)
# CPU twin, run by tests/integration/test_launch_scripts.py: scripts/cpu/pretrain_sharding_stage2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model directory (paddle_llm never downloads)}"
: "${INPUT_DIR:?set INPUT_DIR to a data prefix written by paddle-llm preprocess}"
OUTPUT_DIR=${OUTPUT_DIR:-output/llama_hybrid}
DEVICES=${DEVICES:---gpus 0,1,2,3,4,5,6,7}
NODES=${MASTER:+--master $MASTER --nnodes ${NNODES:-2} --rank ${NODE_RANK:-0}}

# shellcheck disable=SC2086  # DEVICES and NODES are lists of launcher flags
${PYTHON:-python} -u -m paddle.distributed.launch $DEVICES $NODES --log_dir "$OUTPUT_DIR/log_node${NODE_RANK:-0}" \
    run_pretrain.py \
    --model_type llama \
    --model_name_or_path "$MODEL" \
    --tokenizer_name_or_path "$MODEL" \
    --input_dir "$INPUT_DIR" \
    --output_dir "$OUTPUT_DIR" \
    --split 949,50,1 \
    --max_seq_length 2048 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --use_flash_attention 1 \
    --use_fused_rms_norm 0 \
    --fp16 \
    --fp16_opt_level O2 \
    --scale_loss 1024 \
    --learning_rate 0.00001 \
    --min_learning_rate 0.000005 \
    --lr_scheduler_type cosine \
    --max_steps 10000 \
    --save_steps 5000 \
    --weight_decay 0.01 \
    --warmup_ratio 0.01 \
    --max_grad_norm 1.0 \
    --logging_steps 20 \
    --dataloader_num_workers 1 \
    --sharding stage2 \
    --eval_steps 1000 \
    --report_to visualdl \
    --disable_tqdm true \
    --continue_training 1 \
    --recompute 1 \
    --unified_checkpoint 1 \
    --do_train \
    --do_eval \
    --device "${DEVICE:-gpu}" \
    "$@"
