"""Packing: fine-tuning throughput with and without ``--zero_padding`` on a length-skewed dataset, same run.

The dataset's sample lengths run from 8 tokens to ``--max_length`` with a long tail (log-normal: median ~30 tokens, 1% beyond ~380), as
instruction data does: most replies are short, a few are long. Without packing every batch is padded to its longest
sample, so most of each row is padding; with packing, rows are filled with whole samples. Both runs fine-tune the same
model with the same flags, alternating in fresh processes; the table reports the median *non-padding* tokens per
second of each (``train_tokens_per_second`` in train_results.json) and their ratio (target: >= 2x).

Usage: python benchmarks/packing.py [--repeats 2] [--steps 6] [--batch 8] [--max_length 512] [--records 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table, run, write_json  # noqa: E402

# llama-20M (as benchmarks/train_throughput.py): big enough that, as in real models, the matrix multiplies and not the
# attention scores dominate a step, so the measurement is about padding rather than tiny-model quirks.
MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8}
# The process-wide CPU settings paddle_llm.cpu.threads describes (MKL's AVX2 kernels, freed tensors kept in the
# heap instead of unmapped), given to both runs through the environment: without them a step's time grows faster
# than its token count, which would measure glibc's allocator instead of padding.
CPU_ENVIRONMENT = {"MKL_DEBUG_CPU_TYPE": "5", "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
WORDS = ["the", "river", "market", "horse", "lantern", "found", "went", "with", "and", "felt", "happy", "small", "boat"]


def write_skewed_dataset(directory: str, records: int, max_length: int, seed: int) -> dict:
    """src/tgt records whose token lengths follow a long-tailed distribution between 8 and ``max_length``."""
    rng = np.random.default_rng(seed)
    # each word is one or two tokens of the shipped tokenizer; aim at a total of `length` tokens
    lengths = np.clip(np.rint(8 + rng.lognormal(mean=np.log(32), sigma=1.2, size=records)), 8, max_length - 8).astype(int)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train.json"), "w", encoding="utf-8") as f:
        for length in lengths:
            words = rng.choice(WORDS, size=max(2, int(length) // 2))
            cut = max(1, len(words) // 3)
            f.write(json.dumps({"src": " ".join(words[:cut]), "tgt": " ".join(words[cut:])}) + "\n")
    return {"records": records, "median_words_x2": int(np.median(lengths)), "p95_words_x2": int(np.percentile(lengths, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from paddle_llm.config.presets import preset

    os.environ.update(CPU_ENVIRONMENT)
    work = tempfile.mkdtemp(prefix="bench-packing-")
    model_dir = os.path.join(work, "llama-20M")
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(dict(preset("tiny-llama"), **MODEL, architectures=["LlamaForCausalLM"]), f)
    data = os.path.join(work, "data")
    shape = write_skewed_dataset(data, args.records, args.max_length, seed=1)
    runs = {"padded": [], "packed (--zero_padding)": []}
    details = {}
    for repeat in range(args.repeats):
        for name, extra in (("padded", []), ("packed (--zero_padding)", ["--zero_padding", "1"])):
            out = os.path.join(work, f"{'packed' if extra else 'padded'}-{repeat}")
            result = run(
                ["finetune_generation.py", "--model_name_or_path", model_dir, "--tokenizer_name_or_path", "tiny-llama", "--dataset_name_or_path", data, "--output_dir", out,
                 "--do_train", "--device", "cpu", "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
                 "--src_length", str(args.max_length // 2), "--max_length", str(args.max_length), "--learning_rate", "0.001",
                 "--logging_steps", str(args.steps), "--save_steps", "1000000", "--report_to", "none", "--disable_tqdm", "1", "--seed", "1"]
                + extra,
                threads=1,
            )
            with open(os.path.join(out, "train_results.json")) as f:
                runs[name].append(json.load(f)["train_tokens_per_second"])
            details[name] = next((line.split("data: ", 1)[1] for line in result.stderr.splitlines() if "data: " in line), "")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["packed (--zero_padding)"] / medians["padded"]
    rows = [[name, f"{medians[name]:.0f}", ", ".join(f"{v:.0f}" for v in values)] for name, values in runs.items()]
    print(f"\nfine-tuning llama-20M, {args.records} length-skewed records (8..{args.max_length} tokens), batch {args.batch}, {args.steps} steps, 1 thread\n")
    print_table(["run", "non-padding tokens/s (median)", "each run"], rows)
    print(f"\npacked / padded: {ratio:.2f}x (target >= 2x)")
    for name, summary in details.items():
        print(f"  {name}: {summary}")
    path = write_json("packing.json", {"config": vars(args), "dataset": shape, "tokens_per_second": runs, "median": medians, "ratio": ratio, "data_summary": details})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
