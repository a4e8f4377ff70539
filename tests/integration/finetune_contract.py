"""The PEFT contract, run for one model family in a fresh interpreter; prints one JSON result per method.

For each method (full, lora, prefix, lomo) it goes through the real recipe (``finetune.setup`` + ``prepare``), trains
10 steps, and records: the losses, which parameters changed and which were trainable, the logits of the trained
model against the model reloaded from what was saved, and (LoRA) against the merged model, and for LOMO how many
gradients survived the step.

Usage: python tests/integration/finetune_contract.py FAMILY MODEL_DIR DATA_DIR OUTPUT_DIR [METHOD ...]
"""

import json
import os
import sys

import numpy as np

from paddle_llm.models.registry import FAMILIES

METHOD_FLAGS = {
    "full": ["--learning_rate", "1e-3"],
    "lora": ["--lora", "True", "--r", "4", "--learning_rate", "3e-3"],
    "prefix": ["--prefix_tuning", "True", "--num_prefix_tokens", "4", "--learning_rate", "3e-2"],
    "lomo": ["--optim", "lomo", "--learning_rate", "3e-2"],
}


def flags(model_dir, data_dir, output_dir, method):
    return [
        "--model_name_or_path", model_dir, "--dataset_name_or_path", data_dir, "--output_dir", output_dir,
        "--overwrite_output_dir", "--do_train", "--max_steps", "10", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--save_steps", "10", "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu",
        "--src_length", "32", "--tgt_length", "8", "--seed", "3", "--weight_decay", "0.0",
    ] + METHOD_FLAGS[method]


def probe_logits(model, batch):
    import paddle

    model.eval()
    with paddle.no_grad():
        outputs = model(**{k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels"})
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits
    return logits.astype("float32").numpy()


def reload(method, family, model_dir, output_dir):
    """The trained model rebuilt from what the run saved, the way a user would load it."""
    from paddle_llm.models.registry import build_config, build_model, resolve_model
    from paddle_llm.peft.lora import load_lora
    from paddle_llm.peft.prefix import apply_prefix

    if method in ("full", "lomo"):
        source = resolve_model(output_dir)
        return build_model(source, build_config(source), load_weights=True)
    source = resolve_model(model_dir)
    base = build_model(source, build_config(source), load_weights=True)
    if method == "lora":
        return load_lora(base, output_dir, model_dir)
    return apply_prefix(base, family, num_prefix_tokens=0, prefix_path=output_dir, base_path=model_dir)


def run(family, model_dir, data_dir, output_root, method):
    from paddle_llm.data.sft import SftCollator, family_layout
    from paddle_llm.peft.lora import merge_lora
    from paddle_llm.recipes import finetune

    output_dir = os.path.join(output_root, method)
    plan = finetune.setup(flags(model_dir, data_dir, output_dir, method))
    prepared = finetune.prepare(plan)
    trainer = prepared.trainer
    model = trainer.model
    before = {name: p.numpy().copy() for name, p in model.named_parameters()}
    trainable = sorted(name for name, p in model.named_parameters() if not p.stop_gradient)
    trainer.train()
    trainer.save_model()
    changed = sorted(name for name, p in model.named_parameters() if not np.array_equal(before[name], p.numpy()))
    grads_left = sum(1 for p in model.parameters() if p.grad is not None and p.grad._is_initialized())
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]

    batch = SftCollator(family_layout(family, prepared.tokenizer))(prepared.splits["train"].dataset.rows[:3])
    trained_logits = probe_logits(model, batch)
    reloaded = reload(method, family, model_dir, output_dir)
    result = {
        "method": method,
        "losses": losses,
        "trainable": trainable,
        "changed": changed,
        "all": sorted(before),
        "grads_left": grads_left,
        "roundtrip_diff": float(np.abs(probe_logits(reloaded, batch) - trained_logits).max()),
    }
    if method == "lora":
        result["merge_diff"] = float(np.abs(probe_logits(merge_lora(reloaded), batch) - trained_logits).max())
    return result


def main():
    family_name, model_dir, data_dir, output_root = sys.argv[1:5]
    family = FAMILIES[family_name]
    methods = sys.argv[5:] or list(METHOD_FLAGS)
    for method in methods:
        print("CONTRACT " + json.dumps(run(family, model_dir, data_dir, output_root, method)), flush=True)


if __name__ == "__main__":
    main()
