"""Serving speed, same run and same model: exported engine vs PaddleNLP's dygraph ``generate``, and batching.

Measures, for one randomly initialised Llama built from a config (hidden 512, 4 layers by default):

1. decode tokens/s of one request: our engine on the exported graph (Paddle Inference), our engine on the dygraph
   model (no export), and PaddleNLP's ``model.generate`` (greedy, KV cache). Every contender is timed the same way:
   a 1-token run and a ``new_tokens`` run; decode rate = ``(new_tokens - 1) / (difference)``, so prefill is excluded.
2. throughput of 8 clients at once vs the same 8 requests one at a time (continuous batching);
3. first-token latency, alone and under that load.

EOS is ignored so every request generates exactly ``--new_tokens``. Prints a table and writes
``benchmarks/results/serving.json``.

``--vs_generate`` instead runs the side-by-side against Hugging Face transformers ``generate`` on the same weights
(exported with ``export --format hf``, run by ``hf_generate_worker.py`` in a separate torch venv, ``--torch_python``)
and PaddleNLP's ``model.generate`` on the same checkpoint (what PaddleNLP's ``llm/predict/predictor.py`` runs in
dygraph mode): at each concurrency of ``--levels``, N requests at once (the peers: one padded batch of N), tokens/s
(wall clock and per CPU-second), p50/p95 request latency and the ratios, for each of ``--workloads``:

- ``uniform``: every prompt ``--prompt_tokens`` long, every request ``--new_tokens`` long, the peers' best case
  (a padded batch wastes nothing);
- ``mixed``: prompt lengths and output lengths drawn (seed 0) from ``--mixed_prompt_tokens`` and
  ``--mixed_new_tokens``, as requests to a server come; a padded batch pads every prompt to the longest and
  decodes every row to the longest output, and only the tokens each request asked for count.

Every contender runs ``--rounds`` times in turn (ours, PaddleNLP, ``generate``); the tables give the median of the
per-round ratios and their range, so a drift in a shared machine's speed between contenders lands on all of them.
Also where our engine's time goes (model step, cache bookkeeping, sampling), and the prefix cache's hit rate and
first-token time on prompts sharing a system prompt, without and with it. Writes
``benchmarks/results/serving_vs_generate.json`` (every round, and the medians).

    python benchmarks/serving.py                      # defaults: hidden 512, 4 layers, 1 thread
    python benchmarks/serving.py --hidden 256 --threads 2
    python benchmarks/serving.py --vs_generate --torch_python /work/torchvenv/bin/python
    python benchmarks/serving.py --vs_generate --hidden 128 --layers 2 --heads 4   # the demo's tiny-llama shape
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

from hf_generate_worker import client_batches, left_padded, padded_batches_row, percentile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serving.json")
VS_GENERATE_RESULTS_PATH = os.path.join(os.path.dirname(RESULTS_PATH), "serving_vs_generate.json")
HF_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_generate_worker.py")
WORKLOADS = ("uniform", "mixed")


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
    parser.add_argument("--output", default=None, help=f"default {RESULTS_PATH} (or {VS_GENERATE_RESULTS_PATH})")
    parser.add_argument("--vs_generate", action="store_true",
                        help="side by side with transformers generate at each of --levels concurrent clients")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                        help="--vs_generate: equal requests (uniform), or lengths as a server sees them (mixed)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--vs_generate: run every contender this many times, in turn, and report medians (a "
                             "shared machine's speed drifts between contenders run minutes apart)")
    parser.add_argument("--single_client_requests", type=int, default=8,
                        help="--vs_generate: at 1 client, how many requests it sends one after another")
    parser.add_argument("--mixed_prompt_tokens", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"),
                        help="--vs_generate mixed workload: each prompt's length, uniform in [MIN, MAX]")
    parser.add_argument("--mixed_new_tokens", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"),
                        help="--vs_generate mixed workload: each request's max_tokens, uniform in [MIN, MAX]")
    parser.add_argument("--max_batch_size", type=int, default=None, help="our engine's batch (default: its own sizing)")
    parser.add_argument("--system_prompt_tokens", type=int, default=384,
                        help="--vs_generate: the shared prefix of the prefix-cache measurement")
    parser.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON", "/work/torchvenv/bin/python"),
                        help="a Python with torch and transformers (benchmark only, never a project dependency)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


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


def paddlenlp_greedy(model, input_ids: list[list[int]], attention_mask: list[list[int]], new_tokens: int) -> None:
    """PaddleNLP's ``model.generate``, greedy, exactly ``new_tokens`` per row."""
    import paddle

    with paddle.no_grad():
        # A 2-D mask: without one, generate builds a [b, 1, 1, s] mask that Llama cannot reshape for a prompt.
        output_ids, _ = model.generate(paddle.to_tensor(input_ids, dtype="int64"),
                                       attention_mask=paddle.to_tensor(attention_mask, dtype="int64"),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       decode_strategy="greedy_search", use_cache=True)
    assert output_ids.shape[1] == new_tokens


def paddlenlp_generate(checkpoint: str, args) -> dict:
    from paddle_llm.inference.load import load_model
    from paddle_llm.models.registry import resolve_model

    model = load_model(resolve_model(checkpoint))

    def run(new_tokens: int, offset: int) -> None:
        prompt = prompt_of(args.prompt_tokens, offset)
        paddlenlp_greedy(model, [prompt], [[1] * len(prompt)], new_tokens)

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


# ---- side by side with transformers generate ------------------------------------------------------------------------

class PhaseTimer:
    """Where the engine thread's time goes: wraps the model step and the sampling hook of one engine in place."""

    def __init__(self, engine):
        self.seconds = {"model step": 0.0, "sampling + text": 0.0}
        runner = engine.decoder.runner
        runner.run = self._timed(runner.run, "model step")
        engine._accept = self._timed(engine._accept, "sampling + text")

    def _timed(self, function, phase: str):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def split(self, wall: float) -> dict:
        """Each phase's share of ``wall``; the rest is cache bookkeeping, scheduling and Python around them."""
        shares = {phase: seconds / wall for phase, seconds in self.seconds.items()}
        shares["cache bookkeeping + scheduling"] = max(0.0, 1.0 - sum(shares.values()))
        return shares


def requests_of(workload: str, args) -> list[tuple[list[int], int]]:
    """``(prompt ids, new tokens)`` of ``workload``'s requests, as many as the largest level or the single client
    takes (``client_batches``)."""
    count = max(*args.levels, args.single_client_requests)
    if workload == "uniform":
        return [(prompt_of(args.prompt_tokens, 100 + i), args.new_tokens) for i in range(count)]
    draw = random.Random(0)
    return [(prompt_of(draw.randint(*args.mixed_prompt_tokens), 100 + i), draw.randint(*args.mixed_new_tokens))
            for i in range(count)]


def engine_at(engine, batches: list[list[tuple[list[int], int]]]) -> dict:
    """Each of ``batches`` submitted at once, one batch after another: tokens/s over the wall time, p50/p95 request
    latency, p50 first token."""
    from paddle_llm.serving.sampling import SamplingParams

    started, cpu_started, results = time.perf_counter(), time.process_time(), []
    for batch in batches:
        handles = [engine.submit(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0))
                   for prompt, new_tokens in batch]
        results += [handle.result() for handle in handles]
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    asked = [new_tokens for batch in batches for _, new_tokens in batch]
    assert [r.completion_tokens for r in results] == asked, [r.finish_reason for r in results]
    latencies = [r.total_seconds for r in results]
    tokens = sum(asked)
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "wall_s": wall,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
            "first_token_p50_s": percentile([r.first_token_seconds for r in results], 0.5),
            "token_ids": [list(r.token_ids) for r in results]}


def paddlenlp_generate_at(model, batches: list[list[tuple[list[int], int]]]) -> dict:
    """PaddleNLP's ``model.generate`` on each of ``batches`` as one padded batch, as its dygraph predictor batches."""

    def run_batch(batch):
        ids, mask, new_tokens = left_padded(batch)
        started, cpu_started = time.perf_counter(), time.process_time()
        paddlenlp_greedy(model, ids, mask, new_tokens)
        return time.perf_counter() - started, time.process_time() - cpu_started

    return padded_batches_row(run_batch, batches)


def prefix_reuse(engine, args) -> dict:
    """Time to first token of requests sharing a system prompt, one after another, without and with the prefix
    cache (the first request of each run fills it)."""
    from paddle_llm.serving.engine import DEFAULT_PREFIX_CACHE_TOKENS
    from paddle_llm.serving.prefix_cache import PrefixCache
    from paddle_llm.serving.sampling import SamplingParams

    system = prompt_of(args.system_prompt_tokens, 7)
    prompts = [system + prompt_of(8, 500 + i) for i in range(8)]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    results = {}
    for label, cached_tokens in (("without", 0), ("with", DEFAULT_PREFIX_CACHE_TOKENS)):
        engine.prefix_cache = PrefixCache(cached_tokens)  # the engine is idle between runs
        first_tokens = [engine.generate(prompt, params).first_token_seconds for prompt in prompts]
        results[label] = {"first_token_p50_s": statistics.median(first_tokens),
                          "hit_rate": engine.prefix_cache.hit_rate}
    return results


def hf_generate(args, hf_dir: str, requests_file: str) -> dict:
    """transformers ``generate`` at each level on the Hugging Face export, in the torch venv."""
    import subprocess

    command = [args.torch_python, HF_WORKER, hf_dir, "--requests", requests_file, "--threads", str(args.threads),
               "--single_client_requests", str(args.single_client_requests), "--levels", *map(str, args.levels)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"transformers generate failed ({args.torch_python}):\n{done.stderr[-3000:]}")
    return {int(level): row for level, row in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def ours_at_levels(engine, timer: PhaseTimer, requests: list, args) -> dict:
    """Our engine at each level. Continuous batching must not change greedy output: every level's first request
    decodes as at the first level."""
    from paddle_llm.serving.engine import DEFAULT_PREFIX_CACHE_TOKENS
    from paddle_llm.serving.prefix_cache import PrefixCache

    rows, levels = {}, args.levels
    for level in levels:
        # A level's requests include the earlier levels' and the peers recompute every prompt, so each level starts
        # with an empty prefix cache (the engine is idle between runs); prefix_reuse measures the cache itself.
        engine.prefix_cache = PrefixCache(DEFAULT_PREFIX_CACHE_TOKENS)
        timer.reset()
        rows[level] = engine_at(engine, client_batches(requests, level, args.single_client_requests))
        rows[level]["time_split"] = timer.split(rows[level]["wall_s"])
    alone = rows[levels[0]]["token_ids"][0]
    for level in levels:
        assert rows[level].pop("token_ids")[0] == alone, f"batching at {level} changed greedy output"
    return rows


def vs_generate(args) -> dict:
    """Every contender at every level of every workload, ``--rounds`` times in turn (ours, PaddleNLP, ``generate``),
    so a drift in the machine's speed lands on all of them; the ratios are taken within each round."""
    from paddle_llm.export.exporter import FORMAT_HF, ExportRequest, export_checkpoint
    from paddle_llm.inference.load import load_model
    from paddle_llm.models.registry import resolve_model
    from paddle_llm.serving.model import open_export

    workloads = {workload: requests_of(workload, args) for workload in args.workloads}
    with tempfile.TemporaryDirectory(prefix="paddle_llm_serving_vs_generate_") as workdir:
        checkpoint, export_dir, parity = setup(args, workdir)
        hf_dir = os.path.join(workdir, "hf")
        export_checkpoint(ExportRequest(checkpoint, hf_dir, format=FORMAT_HF), log=lambda *_: None)
        requests_files = {}
        for workload, requests in workloads.items():
            requests_files[workload] = os.path.join(workdir, f"{workload}.json")
            with open(requests_files[workload], "w", encoding="utf-8") as f:
                json.dump(requests, f)
        paddlenlp_model = load_model(resolve_model(checkpoint))
        paddlenlp_generate_at(paddlenlp_model, [[(prompt_of(8), 4)]])  # warm-up
        served = open_export(export_dir, num_threads=args.threads, max_batch_size=args.max_batch_size)
        engine = served.engine
        engine.eos_token_ids = frozenset()  # every request runs to its max_tokens, as the peers' min_new_tokens do
        timer = PhaseTimer(engine)
        rounds = []
        try:
            engine_at(engine, [workloads[args.workloads[0]][:2]])  # warm-up
            for _ in range(args.rounds):
                ours = {workload: ours_at_levels(engine, timer, requests, args)
                        for workload, requests in workloads.items()}
                paddlenlp = {workload: {level: paddlenlp_generate_at(paddlenlp_model, client_batches(
                    requests, level, args.single_client_requests)) for level in args.levels}
                    for workload, requests in workloads.items()}
                generate = {workload: hf_generate(args, hf_dir, requests_files[workload]) for workload in workloads}
                rounds.append({workload: {level: {"ours": ours[workload][level], "generate": generate[workload][level],
                                                  "paddlenlp": paddlenlp[workload][level]}
                                          for level in args.levels} for workload in args.workloads})
            prefix = prefix_reuse(engine, args)
        finally:
            engine.shutdown()
    return {"parity": parity.to_dict(), "max_batch_size": engine.max_batch_size, "prefix_cache": prefix,
            "rounds": rounds, "workloads": {workload: {level: median_row([r[workload][level] for r in rounds])
                                                       for level in args.levels} for workload in args.workloads}}


def median_row(rows: list[dict]) -> dict:
    """One level over the rounds: each contender's median rates and latencies, and ours ÷ each peer as the median and
    the range of the per-round ratios."""
    merged = {}
    for name in ("ours", "generate", "paddlenlp"):
        numbers = [key for key, value in rows[0][name].items() if isinstance(value, (int, float))]
        merged[name] = {key: statistics.median(row[name][key] for row in rows) for key in numbers}
    merged["ours"]["time_split"] = {phase: statistics.median(row["ours"]["time_split"][phase] for row in rows)
                                    for phase in rows[0]["ours"]["time_split"]}
    for peer in ("generate", "paddlenlp"):
        ratios = {clock: [row["ours"][key] / row[peer][key] for row in rows]
                  for clock, key in (("wall", "tokens_per_s"), ("cpu", "tokens_per_cpu_s"))}
        merged[f"vs_{peer}"] = {**{clock: statistics.median(values) for clock, values in ratios.items()},
                                "cpu_range": [min(ratios["cpu"]), max(ratios["cpu"])]}
    return merged


def ratio_range(ratios: dict) -> str:
    low, high = ratios["cpu_range"]
    return f"{low:.2f}–{high:.2f}"


def report_vs_generate(args, results: dict) -> None:
    lines = [
        f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab 1024, float32; "
        f"{args.threads} CPU thread(s) each; our batch {results['max_batch_size']}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "Wall-clock rates measure the neighbours too on a shared machine; tokens per CPU-second (each side's process "
        "CPU time, 1 math thread) measure the work. Peers: transformers `generate` (torch) and PaddleNLP "
        "`model.generate`, each on one padded batch of the N requests; 1 client sends "
        f"{args.single_client_requests} requests one after another. Medians of {args.rounds} round(s), each running "
        "every contender in turn; a ratio's range (CPU) over the rounds is in brackets.",
    ]
    workload_titles = {
        "uniform": f"uniform: every prompt {args.prompt_tokens} tokens, every request {args.new_tokens} new tokens",
        "mixed": f"mixed: prompts of {args.mixed_prompt_tokens[0]}-{args.mixed_prompt_tokens[1]} tokens, requests "
                 f"of {args.mixed_new_tokens[0]}-{args.mixed_new_tokens[1]} new tokens (only those count)",
    }
    for workload, levels in results["workloads"].items():
        lines += [
            "", workload_titles[workload], "",
            "| clients | tokens/s: ours / generate / PaddleNLP | tokens per CPU-s: ours / generate / PaddleNLP | "
            "ours ÷ generate (wall, CPU) | ours ÷ PaddleNLP (wall, CPU) | p50 / p95 latency (s): ours; generate; "
            "PaddleNLP |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for level, row in levels.items():
            contenders = [row[name] for name in ("ours", "generate", "paddlenlp")]
            lines.append(
                f"| {level} | " + " / ".join(f"{c['tokens_per_s']:.0f}" for c in contenders)
                + " | " + " / ".join(f"{c['tokens_per_cpu_s']:.0f}" for c in contenders)
                + f" | {row['vs_generate']['wall']:.2f}x, **{row['vs_generate']['cpu']:.2f}x** "
                f"({ratio_range(row['vs_generate'])}) | "
                f"{row['vs_paddlenlp']['wall']:.2f}x, {row['vs_paddlenlp']['cpu']:.2f}x ({ratio_range(row['vs_paddlenlp'])}) | "
                + "; ".join(f"{c['latency_p50_s']:.2f} / {c['latency_p95_s']:.2f}" for c in contenders) + " |")
        splits = {level: row["ours"]["time_split"] for level, row in levels.items()}
        phases = list(next(iter(splits.values())))
        lines += ["", "| clients | " + " | ".join(phases) + " |", "|---:|" + "---:|" * len(phases)]
        lines += [f"| {level} | " + " | ".join(f"{share:.0%}" for share in split.values()) + " |"
                  for level, split in splits.items()]
    prefix = results["prefix_cache"]
    lines += ["", f"| 8 requests sharing a {args.system_prompt_tokens}-token system prompt, one at a time | "
                  "first token p50 (ms) | prefix cache hit rate |", "|---|---:|---:|"]
    lines += [f"| {label} the prefix cache | {prefix[label]['first_token_p50_s'] * 1000:.0f} | "
              f"{prefix[label]['hit_rate']:.0%} |" for label in ("without", "with")]
    print("\n".join(lines))
    output = args.output or VS_GENERATE_RESULTS_PATH
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
                   "results": results}, f, indent=2)
    print(f"\nwrote {output}")


# ---- main ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.vs_generate:
        report_vs_generate(args, vs_generate(args))
        return 0
    if args.max_batch_size is None:
        args.max_batch_size = args.clients
    with tempfile.TemporaryDirectory(prefix="paddle_llm_serving_bench_") as workdir:
        checkpoint, export_dir, parity = setup(args, workdir)
        from paddle_llm.serving.model import open_checkpoint, open_export

        exported = open_export(export_dir, num_threads=args.threads, max_batch_size=args.max_batch_size)
        # EOS ignored: every request runs to --new_tokens, so all contenders do the same work.
        exported.engine.eos_token_ids = frozenset()
        dygraph = open_checkpoint(checkpoint, max_batch_size=args.max_batch_size)
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
    output = args.output or RESULTS_PATH
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "parity": parity.to_dict(), "load_average": os.getloadavg()[0],
                   "cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    sys.exit(main())
