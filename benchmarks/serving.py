"""Serving speed, same run and same model: exported engine vs PaddleNLP's dygraph ``generate``, and batching.

Measures, for one randomly initialised Llama built from a config (hidden 512, 4 layers by default):

1. decode tokens/s of one request: our engine on the exported graph (Paddle Inference), our engine on the dygraph
   model (no export), and PaddleNLP's ``model.generate`` (greedy, KV cache). Every contender is timed the same way:
   a 1-token run and a ``new_tokens`` run; decode rate = ``(new_tokens - 1) / (difference)``, so prefill is excluded.
2. throughput of 8 clients at once vs the same 8 requests one at a time (continuous batching);
3. first-token latency, alone and under that load.

EOS is ignored so every request generates exactly ``--new_tokens``. Prints a table and writes
``benchmarks/results/serving.json``.

    python benchmarks/serving.py                      # defaults: hidden 512, 4 layers, 1 thread
    python benchmarks/serving.py --hidden 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serving.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU math threads for every contender")
    parser.add_argument("--output", default=RESULTS_PATH)
    return parser.parse_args(argv)


# ---- setup ---------------------------------------------------------------------------------------------------------

def setup(args, workdir: str):
    """Configure the CPU runtime, build and save the model, export it. Returns (checkpoint, export_dir, parity)."""
    from paddle_llm.cpu.threads import configure_cpu_runtime

    configure_cpu_runtime(requested_threads=args.threads, device="cpu")
    import paddle

    from paddle_llm.export.exporter import ExportRequest, export_checkpoint
    from paddle_llm.export.parity import check_export
    from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model

    paddle.seed(0)
    source = resolve_model("tiny-llama")
    config = build_config(source, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 32 * 32,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads)
    model = build_model(source, config, load_weights=False)
    checkpoint = os.path.join(workdir, "checkpoint")
    model.save_pretrained(checkpoint)
    load_tokenizer("tiny-llama", source.family).save_pretrained(checkpoint)
    export_dir = os.path.join(workdir, "export")
    export_checkpoint(ExportRequest(checkpoint, export_dir), log=lambda *_: None)
    parity = check_export(export_dir, checkpoint, new_tokens=4)
    return checkpoint, export_dir, parity


def prompt_of(length: int, offset: int = 0) -> list[int]:
    # Ids from the shipped tokenizer's ordinary pieces (above the specials and byte fallbacks).
    return [300 + (offset * 37 + i * 13) % 600 for i in range(length)]


# ---- measurements --------------------------------------------------------------------------------------------------

def decode_rates(run, args) -> dict:
    """Time ``run(new_tokens, offset)`` for 1 and for ``new_tokens`` tokens; the difference is pure decoding.

    Reports wall-clock rates and CPU-time rates (process CPU seconds): on a shared machine the wall clock mostly
    measures the neighbours, CPU time measures the work. The 1-token run's wall time is the first-token latency.
    """
    run(4, 0)  # warm-up
    wall_rates, cpu_rates, first_tokens = [], [], []
    for repeat in range(args.repeats):
        timings = []
        for new_tokens in (1, args.new_tokens):
            wall, cpu = time.perf_counter(), time.process_time()
            run(new_tokens, repeat)
            timings.append((time.perf_counter() - wall, time.process_time() - cpu))
        (wall_1, cpu_1), (wall_n, cpu_n) = timings
        wall_rates.append((args.new_tokens - 1) / (wall_n - wall_1))
        cpu_rates.append((args.new_tokens - 1) / max(cpu_n - cpu_1, 1e-9))
        first_tokens.append(wall_1)
    return {"decode_tokens_per_s": statistics.median(wall_rates),
            "decode_tokens_per_cpu_s": statistics.median(cpu_rates),
            "first_token_s": statistics.median(first_tokens)}


def engine_single(engine, args) -> dict:
    from paddle_llm.serving.sampling import SamplingParams

    def run(new_tokens: int, offset: int) -> None:
        result = engine.generate(prompt_of(args.prompt_tokens, offset), SamplingParams(max_tokens=new_tokens, temperature=0.0))
        assert result.completion_tokens == new_tokens

    return decode_rates(run, args)


def paddlenlp_generate(checkpoint: str, args) -> dict:
    import paddle

    from paddle_llm.inference.load import load_model
    from paddle_llm.models.registry import resolve_model

    model = load_model(resolve_model(checkpoint))

    def run(new_tokens: int, offset: int) -> None:
        input_ids = paddle.to_tensor([prompt_of(args.prompt_tokens, offset)], dtype="int64")
        with paddle.no_grad():
            # A 2-D mask: without one, generate builds a [b, 1, 1, s] mask that Llama cannot reshape for a prompt.
            output_ids, _ = model.generate(input_ids, attention_mask=paddle.ones_like(input_ids),
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           decode_strategy="greedy_search", use_cache=True)
        assert output_ids.shape[1] == new_tokens

    return decode_rates(run, args)


def concurrency(engine, args) -> dict:
    """The same ``clients`` requests one at a time, then all at once."""
    from paddle_llm.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    prompts = [prompt_of(args.prompt_tokens, 100 + i) for i in range(args.clients)]
    started = time.perf_counter()
    alone = [engine.generate(p, params) for p in prompts]
    sequential_s = time.perf_counter() - started

    results = [None] * len(prompts)

    def client(index):
        results[index] = engine.generate(prompts[index], params)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent_s = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    assert [r.token_ids for r in results] == [r.token_ids for r in alone], "batching changed greedy output"
    return {
        "sequential_tokens_per_s": tokens / sequential_s,
        "concurrent_tokens_per_s": tokens / concurrent_s,
        "speedup": sequential_s / concurrent_s,
        "first_token_s_alone_p50": statistics.median(r.first_token_seconds for r in alone),
        "first_token_s_loaded_p50": statistics.median(r.first_token_seconds for r in results),
        "first_token_s_loaded_max": max(r.first_token_seconds for r in results),
    }


# ---- main ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="paddle_llm_serving_bench_") as workdir:
        checkpoint, export_dir, parity = setup(args, workdir)
        from paddle_llm.serving.model import open_checkpoint, open_export

        exported = open_export(export_dir, num_threads=args.threads, max_batch_size=args.clients)
        # EOS ignored: every request runs to --new_tokens, so all contenders do the same work.
        exported.engine.eos_token_ids = frozenset()
        dygraph = open_checkpoint(checkpoint, max_batch_size=args.clients)
        dygraph.engine.eos_token_ids = frozenset()
        try:
            results = {
                "exported_engine": engine_single(exported.engine, args),
                "dygraph_engine": engine_single(dygraph.engine, args),
                "paddlenlp_generate": paddlenlp_generate(checkpoint, args),
                "batching_exported": concurrency(exported.engine, args),
            }
        finally:
            for served in (exported, dygraph):
                served.engine.shutdown()
    report(args, results, parity)
    return 0


def report(args, results: dict, parity) -> None:
    single = {name: results[name] for name in ("exported_engine", "dygraph_engine", "paddlenlp_generate")}
    baseline = single["paddlenlp_generate"]
    batching = results["batching_exported"]
    lines = [
        f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab 1024, float32; prompt "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.threads} CPU thread(s); "
        f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"export parity: {parity.summary().splitlines()[0]}",
        "",
        "| one request | decode tokens/s (wall) | tokens per CPU-second | vs PaddleNLP generate (wall / CPU) | first token (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"exported_engine": "exported graph, our engine (Paddle Inference)",
              "dygraph_engine": "dygraph checkpoint, our engine (`--engine dygraph`)",
              "paddlenlp_generate": "PaddleNLP `model.generate` (dygraph, greedy)"}
    for name, row in single.items():
        lines.append(f"| {labels[name]} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_cpu_s']:.1f} | "
                     f"{row['decode_tokens_per_s'] / baseline['decode_tokens_per_s']:.2f}x / "
                     f"{row['decode_tokens_per_cpu_s'] / baseline['decode_tokens_per_cpu_s']:.2f}x | "
                     f"{row['first_token_s'] * 1000:.1f} |")
    lines += [
        "",
        f"| {args.clients} requests, exported engine | tokens/s | first token p50 (ms) |",
        "|---|---:|---:|",
        f"| one at a time | {batching['sequential_tokens_per_s']:.1f} | {batching['first_token_s_alone_p50'] * 1000:.1f} |",
        f"| {args.clients} concurrent clients (continuous batching) | {batching['concurrent_tokens_per_s']:.1f} | "
        f"{batching['first_token_s_loaded_p50'] * 1000:.1f} |",
        f"| speedup from batching | {batching['speedup']:.2f}x | |",
    ]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "parity": parity.to_dict(), "load_average": os.getloadavg()[0],
                   "cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
