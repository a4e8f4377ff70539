"""Runs Hugging Face transformers ``generate`` for ``serving.py --vs_generate``, inside a torch venv.

Never imported by the project: ``serving.py`` starts it with the venv's Python (``--torch_python``), so torch and
transformers stay benchmark-only. For each concurrency N it generates N requests as one padded batch (what a user
calling ``generate`` on a batch gets), greedy, exactly ``new_tokens`` each, and prints one JSON line.

    /work/torchvenv/bin/python benchmarks/hf_generate_worker.py HF_DIR --prompts prompts.json --new_tokens 64 --levels 1 8
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="written by `paddle-llm export --format hf`")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists, one per request")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32).eval()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)

    def generate(batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
        input_ids = torch.tensor(batch, dtype=torch.long)  # equal lengths: no padding needed
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.no_grad():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        assert output.shape[1] == input_ids.shape[1] + new_tokens
        return elapsed, cpu

    generate(prompts[:1], 4)  # warm-up
    results = {}
    for level in args.levels:
        seconds, cpu = generate(prompts[:level], args.new_tokens)
        # Every request of a padded batch returns when the batch does.
        results[level] = {"tokens_per_s": level * args.new_tokens / seconds,
                          "tokens_per_cpu_s": level * args.new_tokens / cpu, "latency_p50_s": seconds,
                          "latency_p95_s": seconds, "first_token_p50_s": None}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
