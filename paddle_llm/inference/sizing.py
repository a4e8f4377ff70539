"""The serving batch (KV cache slots) a machine and a model can take, when ``serve --max_batch_size`` is not given.

Two limits, the smaller wins:

- memory: every slot may grow to a full-context request, ``2 x layers x kv_heads x head_dim x dtype bytes x context``
  bytes of keys and values; the slots together may take ``MEMORY_SHARE`` of the memory available now (the cgroup's
  limit counts), the rest stays for the weights, activations and the rest of the machine;
- cores: ``ROWS_PER_CORE`` rows per core. A decoding step's fixed cost (the executor's per-op time) is shared by its
  rows, so tokens/s rises with the batch until per-row arithmetic dominates; past that, a bigger batch only makes each
  request slower (``benchmarks/serving.py --vs_generate`` measured tokens/s still rising from 32 to 64 rows on 2 cores
  at hidden 512).
"""

from __future__ import annotations

from dataclasses import dataclass

from paddle_llm.inference.manifest import CacheLayout

MEMORY_SHARE = 0.5
ROWS_PER_CORE = 32
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class BatchSizing:
    """The batch and how it was chosen (``serve`` prints ``reason`` at startup)."""

    max_batch_size: int
    reason: str


def kv_bytes_per_token(layout: CacheLayout, dtype: str) -> int:
    """Keys and values of one position over every layer."""
    return 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * _DTYPE_BYTES[dtype]


def size_batch(layout: CacheLayout, dtype: str, max_context_length: int, cores: int,
               available_memory: int | None) -> BatchSizing:
    """The default ``max_batch_size`` (see the module docstring); ``available_memory`` None: cores alone decide."""
    per_request = kv_bytes_per_token(layout, dtype) * max_context_length
    by_cores = ROWS_PER_CORE * cores
    by_memory = int(available_memory * MEMORY_SHARE // per_request) if available_memory else by_cores
    size = max(1, min(by_cores, by_memory))
    memory_note = (f"{MEMORY_SHARE:.0%} of {available_memory / 2**30:.1f} GiB available / "
                   f"{per_request / 2**20:.1f} MiB of KV cache per {max_context_length}-token request = {by_memory}"
                   if available_memory else "available memory unknown")
    return BatchSizing(size, f"max_batch_size {size}: the smaller of {ROWS_PER_CORE} rows x {cores} cores = {by_cores} "
                             f"and {memory_note} (--max_batch_size sets it)")
