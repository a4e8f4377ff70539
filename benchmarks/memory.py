"""Memory of full fine-tuning with AdamW, SGD and LOMO, and of LoRA on a float32 vs an nf4 (QLoRA) base, on the
same ~57M-parameter Llama, same run.

Each optimizer trains in a fresh process through the real recipe (``finetune.setup`` + ``prepare`` + ``train``), with
the same model, data, batch and steps. Reported per optimizer:

- parameters + gradients + optimizer state: the tensors Paddle still holds once training is done (activations are
  freed after every step; what stays is exactly the model's state: AdamW's two moments and its zeroed gradients,
  SGD's gradients, LOMO's parameters alone), from ``paddle.base.core.host_memory_stat_current_value("Allocated", 0)``;
- Paddle's peak of allocated host memory (``host_memory_stat_peak_value``): the above plus activations and whatever
  a step holds briefly (LOMO: one gradient at a time);
- the process's peak RSS growth over its RSS just before the model was built (peak RSS also counts Python, Paddle's
  libraries and allocator slack; the growth isolates what training added);
- the first and last training loss, to show every run still learns.

QLoRA rows (LoRA r=8 on every projection, AdamW): the same run with ``--weight_quantize_algo nf4`` against a float32
base. Reported: the bytes of the frozen projection weights as stored (nf4 codes + float32 block scales vs float32,
summed over the tensors), the whole model once built (allocator), and the allocator's peak during training alone (its
peak is reset after the model is built, because the base is read in float32 before it is quantized).

Targets: LOMO <= 0.4x AdamW for parameters + gradients + optimizer state; QLoRA base weights <= 0.3x. On a GPU,
``paddle.device.cuda.max_memory_allocated`` would replace the host statistics.

A third table compares LoRA fine-tuning, LoRA-DPO and full DPO on the same model through ``dpo.prepare``: LoRA-DPO's
reference is the base with the adapters off, so it holds one copy of the weights (the same as LoRA fine-tuning),
where full DPO holds two (the policy and its frozen reference). Target: LoRA-DPO's weights held = 1.00x the model.

Usage: python benchmarks/memory.py [--steps 6] [--batch 2] [--max_length 128] [--rows all|optimizers|qlora|dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table, run, write_json  # noqa: E402

# ~57M parameters: a small Llama in the shape of the real ones (vocabulary of the shipped tokenizer).
MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 12}
# Each optimizer at a learning rate that suits it (memory does not depend on it); LOMO is SGD, so they share one.
OPTIMIZERS = {
    "AdamW": ["--optim", "adamw", "--learning_rate", "3e-4"],
    "SGD": ["--optim", "sgd", "--learning_rate", "0.01"],
    "LOMO": ["--optim", "lomo", "--learning_rate", "0.01"],
}

# LoRA on the float32 base and on the nf4 base: the same adapters, optimizer and learning rate.
LORA = ["--lora", "True", "--r", "8", "--optim", "adamw", "--learning_rate", "1e-3"]
QLORA_RUNS = {"LoRA, float32 base": LORA, "QLoRA, nf4 base": LORA + ["--weight_quantize_algo", "nf4"]}

# Runs in a fresh process: train through the recipe, print the memory statistics as one JSON line.
DRIVER = r"""
import json, resource, sys
import paddle
from paddlenlp.peft.lora.lora_layers import LoRALinear
from paddle_llm.peft.qlora import quantized_bytes
from paddle_llm.recipes import finetune

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

def allocated_mb():
    return paddle.base.core.host_memory_stat_current_value("Allocated", 0) / 2**20

plan = finetune.setup(sys.argv[1:])
before_model = rss_mb()
allocated_before = allocated_mb()
run = finetune.prepare(plan)
model = run.trainer.model
parameters_mb = sum(p.numel().item() for p in model.parameters()) * 4 / 2**20
stored, as_float = quantized_bytes(model)
float_lora = sum(l.weight.numel().item() * 4 for l in model.sublayers() if isinstance(l, LoRALinear))
built_mb = allocated_mb() - allocated_before
paddle.base.core.host_memory_stat_reset_peak_value("Allocated", 0)
run.trainer.train()
with open(plan.parsed.value("output_dir") + "/metrics.jsonl") as f:
    losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
print("MEMORY " + json.dumps({
    "model_states_mb": paddle.base.core.host_memory_stat_current_value("Allocated", 0) / 2**20,
    "allocated_peak_mb": paddle.base.core.host_memory_stat_peak_value("Allocated", 0) / 2**20,
    "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_model,
    "parameters_mb": parameters_mb,
    "parameters_m": parameters_mb * 2**20 / 4 / 1e6,
    "base_projections_mb": (stored or float_lora) / 2**20,
    "built_model_mb": built_mb,
    "training_peak_mb": paddle.base.core.host_memory_stat_peak_value("Allocated", 0) / 2**20 - allocated_before,
    "losses": losses,
}))
"""

# LoRA fine-tuning, LoRA-DPO and full DPO, each in a fresh process: the weights every model in the run holds (policy
# plus reference), then the same statistics as DRIVER.
DPO_DRIVER = r"""
import json, sys
import paddle
from paddle_llm.recipes import dpo
from paddle_llm.recipes import finetune

recipe = {"dpo": dpo, "finetune": finetune}[sys.argv[1]]
plan = recipe.setup(sys.argv[2:])
run = recipe.prepare(plan)
models = [run.trainer.model] + [m for m in [getattr(run.trainer, "reference_model", None)] if m is not None]
held_mb = sum(p.numel().item() for m in models for n, p in m.named_parameters() if "lora_" not in n) * 4 / 2**20
run.trainer.train()
with open(plan.parsed.value("output_dir") + "/metrics.jsonl") as f:
    losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
print("MEMORY " + json.dumps({
    "weights_held_mb": held_mb,
    "model_states_mb": paddle.base.core.host_memory_stat_current_value("Allocated", 0) / 2**20,
    "allocated_peak_mb": paddle.base.core.host_memory_stat_peak_value("Allocated", 0) / 2**20,
    "losses": losses,
}))
"""


def preference_memory(work: str, model_dir: str, args) -> dict:
    """The LoRA-DPO rows: LoRA fine-tuning, LoRA-DPO and full DPO on the same model, batch and steps."""
    pairs = os.path.join(work, "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(64):
            prompt = f"In the morning, Ada went to the river with {i % 9 + 1} birds. What did she find?"
            f.write(json.dumps({"prompt": prompt, "chosen": "a small boat", "rejected": "a blue hat and a drum"}) + "\n")
    common = [
        "--model_name_or_path", model_dir, "--tokenizer_name_or_path", "tiny-llama", "--do_train", "--device", "cpu",
        "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch), "--logging_steps", "1",
        "--save_steps", "1000000", "--report_to", "none", "--disable_tqdm", "1", "--seed", "1", "--learning_rate", "3e-4",
    ]
    runs = {
        "LoRA fine-tune": ["finetune", "--dataset_name_or_path", os.path.join(work, "data"), "--lora", "True",
                           "--max_length", str(args.max_length), "--src_length", str(args.max_length // 2)],
        "LoRA DPO": ["dpo", "--train_dataset_path", pairs, "--lora", "True", "--max_seq_len", str(args.max_length), "--max_prompt_len", str(args.max_length // 2)],
        "full DPO": ["dpo", "--train_dataset_path", pairs, "--max_seq_len", str(args.max_length), "--max_prompt_len", str(args.max_length // 2)],
    }
    results = {}
    for name, extra in runs.items():
        output_dir = os.path.join(work, name.replace(" ", "_"))
        output = run(["-c", DPO_DRIVER, extra[0], *common, "--output_dir", output_dir, *extra[1:]], threads=1).stdout
        results[name] = json.loads(next(line for line in output.splitlines() if line.startswith("MEMORY "))[len("MEMORY ") :])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rows", choices=("all", "optimizers", "qlora", "dpo"), default="all", help="which comparison to run")
    args = parser.parse_args()

    from paddle_llm.config.presets import preset

    work = tempfile.mkdtemp(prefix="bench-memory-")
    model_dir = os.path.join(work, "llama-57M")
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(dict(preset("tiny-llama"), **MODEL, architectures=["LlamaForCausalLM"]), f)
    data = os.path.join(work, "data")
    os.makedirs(data)
    with open(os.path.join(data, "train.json"), "w") as f:
        for i in range(64):
            f.write(json.dumps({"src": f"In the morning, Ada went to the river with {i % 9 + 1} birds.", "tgt": "There she found a small boat and felt happy."}) + "\n")

    def flags(name, extra):
        return [
            "--model_name_or_path", model_dir, "--tokenizer_name_or_path", "tiny-llama", "--dataset_name_or_path", data,
            "--output_dir", os.path.join(work, name), "--do_train", "--device", "cpu", "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--max_length", str(args.max_length), "--src_length", str(args.max_length // 2),
            "--logging_steps", "1", "--save_steps", "1000000", "--report_to", "none",
            "--disable_tqdm", "1", "--seed", "1", "--weight_decay", "0.0",
        ] + extra

    payload = {"config": vars(args), "model": MODEL}
    if args.rows in ("all", "optimizers"):
        payload.update(optimizer_rows(args, flags))
    if args.rows in ("all", "qlora"):
        payload.update(qlora_rows(args, flags))
    if args.rows in ("all", "dpo"):
        payload.update(preference_rows(args, work, model_dir))
    path = write_json("memory.json" if args.rows == "all" else f"memory_{args.rows}.json", payload)
    print(f"wrote {path}")


def measure(flags, name, extra) -> dict:
    output = run(["-c", DRIVER] + flags(name, extra), threads=1).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("MEMORY "))[len("MEMORY ") :])


def table_rows(results: dict, reference: dict, keys: tuple[str, ...], digits: int) -> list[list[str]]:
    """Per run: its name, each measurement in MB and as a multiple of ``reference``'s, and its first -> last loss."""
    rows = []
    for name, row in results.items():
        cells = [name]
        for key in keys:
            cells += [f"{row[key]:.{digits}f}", f"{row[key] / reference[key]:.2f}x"]
        rows.append(cells + [f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}"])
    return rows


def optimizer_rows(args, flags) -> dict:
    results = {name: measure(flags, name, extra) for name, extra in OPTIMIZERS.items()}
    adamw = results["AdamW"]
    rows = table_rows(results, adamw, ("model_states_mb", "allocated_peak_mb", "rss_growth_mb"), digits=0)
    print(f"\nfull fine-tuning of a {adamw['parameters_m']:.1f}M-parameter Llama ({adamw['parameters_mb']:.0f} MB of float32 weights), "
          f"batch {args.batch} x {args.max_length} tokens, {args.steps} steps, CPU\n")
    print_table(["optimizer", "params+grads+opt state MB", "vs AdamW", "allocated peak MB", "vs AdamW", "peak RSS growth MB", "vs AdamW", "loss"], rows)
    ratio = results["LOMO"]["model_states_mb"] / adamw["model_states_mb"]
    print(f"\nLOMO / AdamW (parameters + gradients + optimizer state): {ratio:.2f}x (target <= 0.4x)")
    return {"results": results, "lomo_over_adamw": ratio}


def qlora_rows(args, flags) -> dict:
    results = {name: measure(flags, name.split(",")[0], extra) for name, extra in QLORA_RUNS.items()}
    lora, qlora = results.values()
    rows = table_rows(results, lora, ("base_projections_mb", "built_model_mb", "training_peak_mb"), digits=1)
    print(f"\nLoRA r=8 (AdamW) on the {lora['parameters_m']:.1f}M-parameter Llama, float32 vs nf4 base (block 64), "
          f"batch {args.batch} x {args.max_length} tokens, {args.steps} steps, CPU\n")
    print_table(["run", "frozen projections MB", "vs LoRA", "model built MB", "vs LoRA", "training peak MB", "vs LoRA", "loss"], rows)
    ratio = qlora["base_projections_mb"] / lora["base_projections_mb"]
    print(f"\nQLoRA / LoRA base weights: {ratio:.2f}x (target <= 0.3x)")
    return {"qlora_results": results, "qlora_base_over_lora": ratio}


def preference_rows(args, work, model_dir) -> dict:
    preference = preference_memory(work, model_dir, args)
    model_mb = preference["LoRA fine-tune"]["weights_held_mb"]
    print(f"\nLoRA fine-tuning vs LoRA-DPO vs full DPO, same model, batch {args.batch} (pairs for DPO), {args.steps} steps, CPU\n")
    print_table(
        ["run", "weights held MB (policy + reference)", "vs LoRA fine-tune", "params+grads+opt state MB", "allocated peak MB", "loss"],
        [[name, f"{row['weights_held_mb']:.0f}", f"{row['weights_held_mb'] / model_mb:.2f}x", f"{row['model_states_mb']:.0f}",
          f"{row['allocated_peak_mb']:.0f}", f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}"] for name, row in preference.items()],
    )
    lora_dpo_copies = preference["LoRA DPO"]["weights_held_mb"] / model_mb
    print(f"\nLoRA-DPO holds {lora_dpo_copies:.2f}x the model's weights (target 1.00x: no second copy for the reference)")
    return {"preference": preference, "lora_dpo_weight_copies": lora_dpo_copies}


if __name__ == "__main__":
    main()
