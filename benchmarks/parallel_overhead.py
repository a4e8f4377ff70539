"""Communication overhead on gloo, not a GPU projection: tokens/s of each parallel layout on CPU processes.

Every layout runs the same pretraining job (same model, data, steps and global batch) in fresh processes, one math
thread per process, and is compared with the single-process run. "speedup" is tokens/s over the single process;
"efficiency" divides it by the process count, so 1.0 would mean the extra processes cost nothing. On CPU the
collectives go through gloo over loopback TCP and the model-parallel ops through Python PyLayers
(paddle_llm.parallel.cpu_collectives), so these numbers say how much each layout communicates, not how fast it
would run on GPUs with NCCL.

Usage: python benchmarks/parallel_overhead.py [--steps 30] [--seq_len 128] [--global_batch 8]
Writes benchmarks/results/parallel_overhead.json.
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

LABEL = "communication overhead on gloo, not a GPU projection"
# name -> (processes, flags); the per-device batch is set so every layout trains on the same global batch
LAYOUTS = {
    "1 process": (1, {}),
    "data parallel 2": (2, {}),
    "sharding stage1 x2": (2, {"sharding": "stage1"}),
    "sharding stage2 x2": (2, {"sharding": "stage2"}),
    "sharding stage3 x2": (2, {"sharding": "stage3"}),
    "tensor parallel 2": (2, {"tensor_parallel_degree": 2}),
    "pipeline parallel 2": (2, {"pipeline_parallel_degree": 2}),
}
MICRO_BATCHES = 2  # pipeline parallel splits each step into this many micro-batches


def per_device_flags(processes: int, flags: dict, global_batch: int) -> dict:
    """Per-device batch (and micro-batches) giving ``global_batch`` sequences per step under this layout."""
    if "pipeline_parallel_degree" in flags:
        return {"per_device_train_batch_size": global_batch // MICRO_BATCHES, "gradient_accumulation_steps": MICRO_BATCHES}
    data_ranks = processes // int(flags.get("tensor_parallel_degree", 1))
    return {"per_device_train_batch_size": global_batch // data_ranks}


def steady_tokens_per_second(output_dir: str) -> float:
    """Mean of the logged interval rates after the first interval (which includes warm-up)."""
    from paddle_llm.trainer.callbacks import METRICS_FILE

    with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return statistics.mean([row["tokens_per_second"] for row in rows if "loss" in row][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=8)
    args = parser.parse_args()

    from paddle_llm.data.preprocess import preprocess

    work = tempfile.mkdtemp(prefix="bench-parallel-")
    data = os.path.join(work, "demo")
    preprocess(os.path.join(ROOT, "paddle_llm", "assets", "demo_corpus.jsonl"), data, "tiny-llama", append_eos=True, show_progress=False)
    logging_steps = max(1, args.steps // 6)
    results = {}
    for name, (processes, flags) in LAYOUTS.items():
        output = os.path.join(work, name.replace(" ", "_"))
        command = {
            "model_name_or_path": "tiny-llama", "input_dir": data, "output_dir": output, "device": "cpu",
            "max_steps": args.steps, "max_seq_length": args.seq_len, "learning_rate": 0.001, "logging_steps": logging_steps,
            "save_steps": 10**6, "report_to": "none", "disable_tqdm": 1, "seed": 1, "do_train": 1,
            **flags, **per_device_flags(processes, flags, args.global_batch),
        }
        argv = ["run_pretrain.py"] + [str(t) for k, v in command.items() for t in (f"--{k}", v)]
        if processes > 1:
            argv = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(processes), "--log_dir", os.path.join(work, "log", name.replace(" ", "_"))] + argv
        run(argv, threads=1)
        results[name] = {"processes": processes, "flags": command | {"input_dir": "demo", "output_dir": "-"}, "tokens_per_second": round(steady_tokens_per_second(output), 1)}
        print(f"{name}: {results[name]['tokens_per_second']} tokens/s", file=sys.stderr)

    baseline = results["1 process"]["tokens_per_second"]
    rows = []
    for name, result in results.items():
        result["speedup"] = round(result["tokens_per_second"] / baseline, 3)
        result["efficiency"] = round(result["speedup"] / result["processes"], 3)
        rows.append([name, result["processes"], result["tokens_per_second"], f"{result['speedup']:.2f}x", f"{result['efficiency']:.2f}"])
    print(f"\nParallel layouts on CPU processes: {LABEL}")
    print(f"tiny-llama, sequence {args.seq_len}, global batch {args.global_batch}, {args.steps} steps, 1 thread per process\n")
    print_table(["layout", "processes", "tokens/s", "speedup", "efficiency"], rows)
    path = write_json(
        "parallel_overhead.json",
        {"label": LABEL, "model": "tiny-llama", "seq_len": args.seq_len, "global_batch": args.global_batch, "steps": args.steps,
         "threads_per_process": 1, "cpu_count": os.cpu_count(), "layouts": results},
    )
    print(f"\nwritten: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
