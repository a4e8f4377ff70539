"""Training throughput: ``paddle-llm pretrain`` vs a plain PaddleNLP Trainer script, same config, data and batch.

Both run in fresh processes, alternating (ours, plain, ours, plain, ...) so machine noise hits both alike; the
table reports the median tokens/s of each and their ratio (target: ours >= 0.97x plain).

Usage: python benchmarks/train_throughput.py [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, print_table, run, write_json  # noqa: E402

MODELS = {
    # name: (config overrides on tiny-llama, batch, sequence length)
    "tiny-llama (0.7M)": ({}, 8, 128),
    "llama-20M": ({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8}, 4, 256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from paddle_llm.config.presets import preset
    from paddle_llm.data.preprocess import preprocess

    work = tempfile.mkdtemp(prefix="bench-train-")
    data = os.path.join(work, "demo")
    preprocess(os.path.join(ROOT, "paddle_llm", "assets", "demo_corpus.jsonl"), data, "tiny-llama", append_eos=True, show_progress=False)
    rows, results = [], {}
    for name, (overrides, batch, seq_len) in MODELS.items():
        model_dir = os.path.join(work, name.split()[0])
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(dict(preset("tiny-llama"), **overrides, architectures=["LlamaForCausalLM"]), f)
        ours, plain = [], []
        for repeat in range(args.repeats):
            out = os.path.join(work, f"ours-{name[:4]}-{repeat}")
            run(["run_pretrain.py", "--model_name_or_path", model_dir, "--tokenizer_name_or_path", "tiny-llama", "--input_dir", data, "--output_dir", out,
                 "--device", "cpu", "--max_steps", str(args.steps), "--per_device_train_batch_size", str(batch),
                 "--max_seq_length", str(seq_len), "--learning_rate", "0.001", "--logging_steps", str(args.steps),
                 "--save_steps", "1000000", "--do_train", "--report_to", "none", "--disable_tqdm", "1", "--seed", "1"])
            with open(os.path.join(out, "train_results.json")) as f:
                ours.append(json.load(f)["train_tokens_per_second"])
            baseline = run(["benchmarks/plain_paddlenlp_pretrain.py", model_dir, data, os.path.join(work, f"plain-{repeat}"),
                            str(args.steps), str(batch), str(seq_len)])
            metrics = json.loads(baseline.stdout.strip().splitlines()[-1])
            plain.append(metrics["train_samples_per_second"] * seq_len)
        ours_median, plain_median = statistics.median(ours), statistics.median(plain)
        ratio = ours_median / plain_median
        rows.append([name, f"{batch}x{seq_len}", f"{ours_median:,.0f}", f"{plain_median:,.0f}", f"{ratio:.2f}x"])
        results[name] = {"batch": batch, "seq_len": seq_len, "ours_tokens_per_second": ours, "plain_tokens_per_second": plain, "ratio_of_medians": ratio}
    print_table(["model", "batch x seq", "paddle-llm pretrain tok/s", "plain PaddleNLP Trainer tok/s", "ratio"], rows)
    print("written:", write_json("train_throughput.json", {"steps": args.steps, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
