"""Per-request sampling on one row of logits: repetition penalty, temperature, top-k, top-p, then a draw.

Pure numpy, so every function is unit-tested without a model. The order matches Hugging Face / PaddleNLP logits
processors: penalty on raw logits, then temperature, then top-k, then top-p over what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it sampling is close to uniform noise

@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    Attributes:
        max_tokens: most new tokens to generate.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 = all).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL-style: positive logits are
            divided by it, negative ones multiplied).
        stop: strings that end the output; the stop string itself is not returned.
        seed: makes sampling reproducible per request; None draws from fresh entropy.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None

    def validate(self) -> None:
        """Raises: ValueError naming the field and its allowed range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must hold non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, seen_token_ids: np.ndarray, penalty: float) -> np.ndarray:
    """Penalise every token id in ``seen_token_ids`` once (duplicates do not stack)."""
    if penalty == 1.0 or seen_token_ids.size == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(seen_token_ids)
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Set everything below the k-th largest logit to -inf (ties with the k-th survive)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens until their probability mass reaches ``p``; the top token always survives."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    mass_before = np.cumsum(probs) - probs
    keep_sorted = mass_before < p
    keep = np.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen_token_ids: np.ndarray) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[vocab]`` float32.
        params: the request's sampling settings.
        rng: the request's own generator (seeded from ``params.seed``).
        seen_token_ids: prompt and generated ids, for the repetition penalty.
    """
    logits = apply_repetition_penalty(logits.astype(np.float64), seen_token_ids, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return int(rng.choice(logits.shape[-1], p=softmax(logits)))
