"""Preprocessing throughput: ``paddle-llm preprocess --workers N`` vs a plain single-process tokenize loop.

Same corpus (the shipped one, repeated to ~30k documents), same tokenizer, same run. Reports docs/s and tokens/s.

Usage: python benchmarks/preprocess_throughput.py [--copies 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, print_table, write_json  # noqa: E402


def plain_loop(path: str, tokenizer) -> tuple[int, int, float]:
    """What a user writes first: read, json.loads, tokenize, collect; one process."""
    start = time.perf_counter()
    documents = tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            documents += 1
            tokens += len(ids)
    return documents, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from paddle_llm.data.preprocess import preprocess
    from paddle_llm.models.registry import load_tokenizer

    work = tempfile.mkdtemp(prefix="bench-pre-")
    corpus = os.path.join(work, "corpus.jsonl")
    with open(os.path.join(ROOT, "paddle_llm", "assets", "demo_corpus.jsonl"), encoding="utf-8") as f:
        text = f.read()
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(text * args.copies)

    documents, tokens, seconds = plain_loop(corpus, load_tokenizer("tiny-llama"))
    rows = [["plain single-process loop", documents, f"{documents / seconds:,.0f}", f"{tokens / seconds:,.0f}", f"{seconds:.2f}"]]
    results = {"plain": {"docs_per_second": documents / seconds, "tokens_per_second": tokens / seconds, "seconds": seconds}}
    for workers in sorted({1, args.workers}):
        summary = preprocess(corpus, os.path.join(work, f"out{workers}"), "tiny-llama", append_eos=True, workers=workers, show_progress=False)
        rows.append([f"paddle-llm preprocess --workers {workers}", summary["documents"], f"{summary['docs_per_second']:,.0f}",
                     f"{summary['tokens_per_second']:,.0f}", f"{summary['seconds']:.2f}"])
        results[f"ours_workers_{workers}"] = summary
    print_table(["method", "docs", "docs/s", "tokens/s", "seconds"], rows)
    print("written:", write_json("preprocess_throughput.json", results))


if __name__ == "__main__":
    main()
