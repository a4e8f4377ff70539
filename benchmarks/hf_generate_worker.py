"""Runs Hugging Face transformers ``generate`` for ``serving.py --vs_generate``, inside a torch venv.

Never imported by the project: ``serving.py`` starts it with the venv's Python (``--torch_python``), so torch and
transformers stay benchmark-only (``serving.py`` imports only its padding and rate helpers; torch is imported in
``main``). For each concurrency N > 1 it generates the first N requests as one padded batch
(what a user calling ``generate`` on a batch gets): prompts left-padded to the longest, greedy, every row decoded to
the largest ``new_tokens`` of the batch; one client sends its requests one after another. Only each request's own
``new_tokens`` count as its output. Prints one JSON line.

    /work/torchvenv/bin/python benchmarks/hf_generate_worker.py HF_DIR --requests requests.json --levels 1 8

``requests.json`` is a list of ``[prompt token ids, new_tokens]``, one per request.
"""

from __future__ import annotations

import argparse
import json
import time

PAD_ID = 0


def left_padded(requests: list) -> tuple[list[list[int]], list[list[int]], int]:
    """``(input ids, attention mask, new tokens)`` of a padded batch: prompts left-padded to the longest, and the
    batch decodes as many tokens as its longest request asks for."""
    longest = max(len(prompt) for prompt, _ in requests)
    ids = [[PAD_ID] * (longest - len(prompt)) + list(prompt) for prompt, _ in requests]
    mask = [[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt, _ in requests]
    return ids, mask, max(new_tokens for _, new_tokens in requests)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def client_batches(requests: list, level: int, single_client_requests: int) -> list[list]:
    """What ``level`` clients send: the first ``level`` requests at once, or for one client, the first
    ``single_client_requests`` one after another."""
    if level == 1:
        return [requests[i:i + 1] for i in range(single_client_requests)]
    return [requests[:level]]


def padded_batches_row(run_batch, batches: list[list]) -> dict:
    """Rates of ``batches`` run one after another, each as one padded batch by ``run_batch(batch) -> (seconds, CPU
    seconds)``: only the tokens each request asked for count, and every request returns when its batch does."""
    tokens, seconds, cpu_seconds, latencies = 0, 0.0, 0.0, []
    for batch in batches:
        wall, cpu = run_batch(batch)
        tokens += sum(new_tokens for _, new_tokens in batch)
        seconds, cpu_seconds = seconds + wall, cpu_seconds + cpu
        latencies += [wall] * len(batch)
    return {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="written by `paddle-llm export --format hf`")
    parser.add_argument("--requests", required=True, help="JSON list of [prompt token ids, new_tokens]")
    parser.add_argument("--levels", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--single_client_requests", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32).eval()
    with open(args.requests, encoding="utf-8") as f:
        requests = json.load(f)

    def generate(batch: list) -> tuple[float, float]:
        ids, mask, new_tokens = left_padded(batch)
        input_ids = torch.tensor(ids, dtype=torch.long)
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.no_grad():
            output = model.generate(input_ids, attention_mask=torch.tensor(mask, dtype=torch.long),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=PAD_ID)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        assert output.shape[1] == input_ids.shape[1] + new_tokens
        return elapsed, cpu

    generate([[requests[0][0], 4]])  # warm-up
    print(json.dumps({level: padded_batches_row(generate, client_batches(requests, level, args.single_client_requests))
                      for level in args.levels}))


if __name__ == "__main__":
    main()
