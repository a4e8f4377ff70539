"""The baseline for train_throughput.py: PaddleNLP's own pretraining path with nothing of ours in the loop.

PaddleNLP's Trainer, TrainingArguments, causal dataset and model classes, wired the way llm/run_pretrain.py wires
them. Prints one JSON line with the Trainer's train metrics.

Usage: python benchmarks/plain_paddlenlp_pretrain.py MODEL_DIR DATA_PREFIX OUTPUT_DIR MAX_STEPS BATCH SEQ_LEN
"""

import json
import sys

import numpy as np
import paddle
from paddlenlp.data.causal_dataset import build_train_valid_test_datasets
from paddlenlp.trainer import Trainer, TrainingArguments, set_seed
from paddlenlp.transformers import AutoConfig, AutoModelForCausalLM


def collate(samples):
    tokens = np.stack([np.asarray(s["text"], dtype="int64") for s in samples])
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def main() -> None:
    model_dir, data_prefix, output_dir = sys.argv[1:4]
    max_steps, batch, seq_len = (int(x) for x in sys.argv[4:7])
    paddle.set_device("cpu")
    set_seed(1)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        logging_steps=max_steps, save_steps=10**9, do_train=True, device="cpu", report_to=[], disable_tqdm=True,
        seed=1, overwrite_output_dir=True,
    )
    train, _, _ = build_train_valid_test_datasets(
        data_prefix=[data_prefix], data_impl="mmap", splits_string="949,50,1",
        train_val_test_num_samples=[max_steps * batch, 0, 0], seq_length=seq_len, seed=1,
        skip_warmup=True, share_folder=False, data_cache_path=None, need_data=True,
    )
    config = AutoConfig.from_pretrained(model_dir)
    config.seq_length = seq_len
    model = AutoModelForCausalLM.from_config(config)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    result = trainer.train()
    print(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
