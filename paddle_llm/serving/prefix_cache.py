"""Reusing the KV cache of prompt prefixes that requests share (a chat system prompt, few-shot examples).

Prompts are cut into blocks of ``BLOCK_TOKENS`` tokens; a block is keyed by its tokens, every token before it (a
hash chain) and the row's adapter (the chain's root), because its keys and values depend on all three. A block keeps its tokens and its parent's key, checked on
every hit, so a hash collision is a miss, never another prompt's cache. After a request's prompt is prefilled, its full blocks are
stored (copies of its cache columns); a later prompt starting with the same blocks gets them written into its slot
and prefills only the rest. At least the prompt's last token is always run: its logits give the first new token.

Bounded: at most ``max_tokens`` cached positions, the least recently used blocks go first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np

BLOCK_TOKENS = 16


class PrefixCache:
    """Blocks of cached cache columns, keyed by hash chain; least recently used first out."""

    def __init__(self, max_tokens: int):
        self.max_blocks = max_tokens // BLOCK_TOKENS
        # key -> (parent key, tokens, one [BLOCK_TOKENS, ...] array per layer's key and value)
        self._blocks: OrderedDict[int, tuple[Hashable, tuple[int, ...], list[np.ndarray]]] = OrderedDict()
        self.looked_up_tokens = 0
        self.hit_tokens = 0

    @staticmethod
    def _chain(prompt: Sequence[int], blocks: int, root: Hashable = 0) -> list[tuple[Hashable, Hashable, tuple[int, ...]]]:
        """``(key, parent key, tokens)`` of the first ``blocks`` blocks; the first block's parent is ``root`` itself,
        compared exactly on a hit."""
        chain, key = [], root
        for block in range(blocks):
            tokens = tuple(prompt[block * BLOCK_TOKENS:(block + 1) * BLOCK_TOKENS])
            parent, key = key, hash((key, tokens))
            chain.append((key, parent, tokens))
        return chain

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache over prompt tokens looked up."""
        return self.hit_tokens / self.looked_up_tokens if self.looked_up_tokens else 0.0

    def lookup(self, prompt: Sequence[int], adapter: Hashable = 0) -> list[list[np.ndarray]]:
        """The cached blocks ``prompt`` starts with under ``adapter`` (each: one ``[BLOCK_TOKENS, ...]`` array per
        layer's key and value), leaving at least its last token to run; counts the hit rate."""
        found = []
        for key, parent, tokens in self._chain(prompt, (len(prompt) - 1) // BLOCK_TOKENS, adapter):
            block = self._blocks.get(key)
            if block is None or block[:2] != (parent, tokens):
                break
            self._blocks.move_to_end(key)
            found.append(block[2])
        self.looked_up_tokens += len(prompt)
        self.hit_tokens += len(found) * BLOCK_TOKENS
        return found

    def missing_blocks(self, prompt: Sequence[int], adapter: Hashable = 0) -> list[tuple[int, tuple]]:
        """``(block index, its chain link)`` of ``prompt``'s full blocks not cached yet under ``adapter`` (what
        ``store`` takes)."""
        if self.max_blocks == 0:
            return []
        chain = self._chain(prompt, len(prompt) // BLOCK_TOKENS, adapter)
        return [(index, link) for index, link in enumerate(chain) if link[0] not in self._blocks]

    def store(self, link: tuple, columns: list[np.ndarray]) -> None:
        """Keep one block's cache columns under ``link`` (from ``missing_blocks``)."""
        key, parent, tokens = link
        self._blocks[key] = (parent, tokens, columns)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
