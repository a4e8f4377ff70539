"""Per-request sampling on one row of logits: logit bias, penalties, temperature, top-k, top-p, then a draw.

Pure numpy, so every function is unit-tested without a model. The order matches Hugging Face / PaddleNLP logits
processors: bias and penalties on raw logits, then temperature, then top-k, then top-p over what is left. The
presence and frequency penalties are OpenAI's: ``logit - frequency_penalty * count - presence_penalty * (count > 0)``
over the tokens generated so far (not the prompt's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it sampling is close to uniform noise
MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty, either sign
MAX_LOGIT_BIAS = 100.0  # OpenAI's: -100 bans a token, 100 forces it
MAX_TOP_LOGPROBS = 20
NO_TOKENS = np.zeros(0, dtype="int64")

@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    Attributes:
        max_tokens: most new tokens to generate; 0 only scores the prompt (completions' ``echo``, as lm-eval asks).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 = all).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL-style: positive logits are
            divided by it, negative ones multiplied).
        stop: strings that end the output; the stop string itself is not returned.
        seed: makes sampling reproducible per request; None draws from fresh entropy.
        presence_penalty, frequency_penalty: OpenAI's penalties in [-2, 2] on tokens already generated.
        logit_bias: ``(token_id, bias)`` pairs added to the raw logits, bias in [-100, 100].
        logprobs: return each sampled token's log-probability and this many top alternatives (None: none).
        prompt_logprobs: also return the log-probability of every prompt token after the first.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def validate(self) -> None:
        """Raises: ValueError naming the field and its allowed range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)!r}")
        for token_id, bias in self.logit_bias:
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {bias!r} for token {token_id}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

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


def apply_logit_bias(logits: np.ndarray, logit_bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Add each ``(token_id, bias)`` to its logit (ids past the row are the caller's to refuse)."""
    if not logit_bias:
        return logits
    logits = logits.copy()
    for token_id, bias in logit_bias:
        logits[token_id] += bias
    return logits


def apply_presence_frequency_penalty(logits: np.ndarray, generated_token_ids: np.ndarray, presence: float,
                                     frequency: float) -> np.ndarray:
    """OpenAI's penalties: each generated token's logit loses ``frequency * count + presence``."""
    if (presence == 0.0 and frequency == 0.0) or generated_token_ids.size == 0:
        return logits
    logits = logits.copy()
    tokens, counts = np.unique(generated_token_ids, return_counts=True)
    logits[tokens] -= frequency * counts + presence
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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen_token_ids: np.ndarray,
                 generated_token_ids: np.ndarray = NO_TOKENS) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[vocab]`` float32.
        params: the request's sampling settings.
        rng: the request's own generator (seeded from ``params.seed``).
        seen_token_ids: prompt and generated ids, for the repetition penalty.
        generated_token_ids: generated ids only, for the presence and frequency penalties.
    """
    logits = apply_logit_bias(logits.astype(np.float64), params.logit_bias)
    logits = apply_repetition_penalty(logits, seen_token_ids, params.repetition_penalty)
    logits = apply_presence_frequency_penalty(logits, generated_token_ids, params.presence_penalty,
                                              params.frequency_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return int(rng.choice(logits.shape[-1], p=softmax(logits)))
