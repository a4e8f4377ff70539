#!/usr/bin/env bash
# CPU twin of scripts/pretrain_sharding_stage2.sh: the same command on 2 CPU processes (sharding stage 2 over 2
# ranks) with the tiny Llama preset and the shipped demo corpus, 3 steps. GPU-only flags (--fp16, flash
# attention) fall back with one warning each. Extra flags are passed on; so are the multi-node variables.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/paddle_llm_twins}
if [ -z "${INPUT_DIR:-}" ]; then
    INPUT_DIR=$WORK/data/demo
    [ -f "$INPUT_DIR.idx" ] || ${PYTHON:-python} -m paddle_llm.cli preprocess --input_path paddle_llm/assets/demo_corpus.jsonl \
        --output_prefix "$INPUT_DIR" --tokenizer_name_or_path tiny-llama --append_eos --disable_tqdm
fi
export MODEL=${MODEL:-tiny-llama} INPUT_DIR OUTPUT_DIR=${OUTPUT_DIR:-$WORK/pretrain_sharding_stage2}
export DEVICES=${DEVICES:---nproc_per_node 2} DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec bash scripts/pretrain_sharding_stage2.sh --continue_training 0 --max_seq_length 64 --per_device_train_batch_size 2 \
    --max_steps 3 --save_steps 3 --eval_steps 3 --eval_iters 1 --logging_steps 1 --report_to none "$@"
