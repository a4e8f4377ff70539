"""The decoding engine: continuous batching around a ``StepDecoder``, with per-request sampling and streaming.

No web imports: REST and gRPC sit on top of ``Engine.submit``. One background thread owns the model and its
preallocated KV cache of ``max_batch_size`` slots. Each iteration it (1) gives waiting requests free slots, (2) runs
one prefill chunk: up to ``prefill_chunk_tokens`` prompt tokens of the requests still prefilling, so a long prompt
is spread over several iterations instead of stalling the running decodes, (3) runs one decoding step for every
request whose prompt is in, and (4) frees the slots of finished or cancelled requests. So a new request joins at
the next step and a finished one leaves at once, without waiting for the rest of the batch, and nothing is copied
but the rows that move.

Slots: decoding requests hold slots ``0 .. len(decoding)-1`` (``_Sequence.slot``), in order, which is what one
decoding step runs; prefilling requests hold slots above them. A request's per-row data (its sampling settings, its
adapter or grammar state) rides on its ``_Sequence``; the row it occupies in a step is its slot in a decoding step
and its index in ``_prefill_chunk``'s list in a prefill.

Every request gets its events through a listener called on the engine thread (default: a ``queue.SimpleQueue`` the
caller iterates). An event carries the new text since the previous one; the last one has a ``finish_reason``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from paddle_llm.serving.prefix_cache import BLOCK_TOKENS, PrefixCache
from paddle_llm.serving.sampling import NO_TOKENS, SamplingParams, log_softmax, sample_token
from paddle_llm.serving.text_stream import IncrementalDetokenizer, StopStringFilter, text_decoder

FINISH_STOP = "stop"  # EOS token or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context ran out
FINISH_CANCELLED = "cancelled"  # the client went away
FINISH_ERROR = "error"  # the model step raised; ``StreamEvent.error`` says why
DEFAULT_PREFILL_CHUNK_TOKENS = 256
DEFAULT_PREFIX_CACHE_TOKENS = 4096


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class LogitsProcessor(Protocol):
    """Per-request state that shapes each step's logits, such as a grammar (``serving.grammar.GrammarConstraint``):
    ``process`` runs on the raw row before sampling, ``accept_token`` after, with the token that was sampled."""

    def process(self, logits: np.ndarray) -> np.ndarray: ...

    def accept_token(self, token_id: int) -> None: ...


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw logits: before bias, penalties and temperature), and the most
    likely alternatives at its position, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """``token_id``'s log-probability in one row of logits, with the ``top`` most likely ids."""
    logprobs = log_softmax(logits)
    best = np.argsort(-logprobs, kind="stable")[:top] if top else ()
    return TokenLogprob(int(token_id), float(logprobs[token_id]), tuple((int(i), float(logprobs[i])) for i in best))


@dataclass(frozen=True)
class StreamEvent:
    """One update of a request.

    Attributes:
        text: text generated since the previous event (may be empty while a character or stop string is pending).
        token_ids: ids sampled since the previous event.
        finish_reason: None until the last event; then ``stop``, ``length``, ``cancelled`` or ``error``.
        prompt_tokens, completion_tokens: usage so far.
        error: what went wrong when ``finish_reason == "error"``.
        logprobs: one per id in ``token_ids`` when the request asked for logprobs (``SamplingParams.logprobs``).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A finished request, gathered from its events."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    first_token_seconds: float | None
    total_seconds: float
    error: str | None = None


class RequestHandle:
    """The caller's side of a request: iterate events, gather a ``Completion``, or cancel."""

    def __init__(self, request_id: int, listener: Callable[[StreamEvent], None] | None):
        self.request_id = request_id
        self.created = time.perf_counter()
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # With ``SamplingParams.prompt_logprobs``: one per prompt token after the first, set before the first event.
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self._events: queue.SimpleQueue | None = None if listener else queue.SimpleQueue()
        self._listener = listener or self._events.put
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (safe from any thread, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _deliver(self, event: StreamEvent) -> None:
        if event.token_ids and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if event.finish_reason is not None:
            self.finished_time = time.perf_counter()
        try:
            self._listener(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (e.g. its event loop closed): stop generating
            self._cancelled.set()

    def __iter__(self) -> Iterator[StreamEvent]:
        """Yield events until the last one (only for handles submitted without a listener)."""
        if self._events is None:
            raise RuntimeError("this request delivers events to its listener; it cannot be iterated")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Block until the request finishes and return everything it produced."""
        pieces, token_ids, last = [], [], None
        for last in self:
            pieces.append(last.text)
            token_ids.extend(last.token_ids)
        return Completion(
            text="".join(pieces),
            token_ids=tuple(token_ids),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            first_token_seconds=None if self.first_token_time is None else self.first_token_time - self.created,
            total_seconds=(self.finished_time or time.perf_counter()) - self.created,
            error=last.error,
        )


@dataclass
class _Sequence:
    """Engine-side state of one request."""

    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    max_new_tokens: int
    seen_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    last_token: int = -1
    finished: bool = False
    adapter: int = 0  # the decoder's adapter slot for this row (0: the base model)
    last_logprob: tuple[TokenLogprob, ...] = ()
    processors: tuple[LogitsProcessor, ...] = ()
    slot: int = -1  # its row of the decoder's cache
    prefilled: int = 0  # prompt tokens already in the cache
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @functools.cached_property  # asked for each row at each step; what it reads never changes
    def takes_argmax(self) -> bool:
        """Its next token is the raw logits' argmax: greedy, and nothing (bias, penalty, processor) reshapes them."""
        params = self.params
        return (params.greedy and not params.logit_bias and not self.processors and params.repetition_penalty == 1.0
                and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)


@dataclass
class EngineStats:
    """Counters since start (read with ``Engine.stats``)."""

    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_batches: int = 0  # prefill chunks run
    finished_requests: int = 0
    prefix_cache_hit_rate: float = 0.0  # prompt tokens whose KV came from the prefix cache, over all looked up


class Engine:
    """Continuous-batching generation over a ``StepDecoder`` (graph or dygraph, see ``paddle_llm.inference.runtime``)."""

    def __init__(
        self,
        decoder,
        tokenizer,
        eos_token_ids: Sequence[int],
        max_context_length: int,
        max_batch_size: int = 16,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
    ):
        """
        Args:
            decoder: a ``StepDecoder``; its cache is resized to ``max_batch_size`` slots.
            tokenizer: decodes generated ids (streaming text and stop strings need text).
            eos_token_ids: ids that end a request with ``finish_reason="stop"``.
            max_context_length: prompt + output never exceed this many positions.
            max_batch_size: most requests holding a cache slot (prefilling or decoding); more wait their turn.
            prefill_chunk_tokens: most prompt tokens prefilled between two decoding steps.
            prefix_cache_tokens: most prompt positions whose KV cache is kept for prompts that start alike
                (``serving.prefix_cache``); 0 turns prefix caching off.

        Raises:
            ValueError: ``max_batch_size`` or ``prefill_chunk_tokens`` below 1, ``prefix_cache_tokens`` below 0.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0, got {prefix_cache_tokens}")
        self.decoder = decoder
        decoder.resize(max_batch_size)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids)
        self.max_context_length = max_context_length
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens)  # engine thread only; its counters are read anywhere
        # Embedding tables are often padded past the tokenizer (e.g. 1024 rows for 1000 pieces); those ids cannot be
        # decoded to text, so they are never sampled.
        self.sampled_vocab_size = len(tokenizer)
        self._decode_text = text_decoder(tokenizer)
        self._decode_text.follows_text  # its known piece texts are built now, not during the first request
        self._ids = itertools.count(1)
        self._condition = threading.Condition()
        self._waiting: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []  # in arrival order
        self._decoding: list[_Sequence] = []  # _decoding[i].slot == i
        self._closing = False
        self._abort_reason: str | None = None
        self._stats = EngineStats()
        self._unfinished_per_adapter: collections.Counter = collections.Counter()
        self._thread: threading.Thread | None = None

    # ---- caller side ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the decoding thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="paddle-llm-engine", daemon=True)
            self._thread.start()
        return self

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        listener: Callable[[StreamEvent], None] | None = None,
        processors: Sequence[LogitsProcessor] = (),
        adapter: int = 0,
    ) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step.

        Args:
            prompt_ids: the encoded prompt (non-empty, shorter than the context).
            params: validated sampling settings.
            listener: called with each ``StreamEvent`` on the engine thread; None gives an iterable handle.
            processors: this request's own logits processors (each used by this request only), applied in order.
            adapter: the decoder's LoRA adapter slot this request decodes with (0: the base model).

        Raises:
            ValueError: empty prompt, prompt filling the context, or invalid params.
            EngineClosedError: the engine is shutting down.
        """
        params.validate()
        if len(prompt_ids) == 0:
            raise ValueError("the prompt encodes to no tokens")
        room = self.max_context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context_length}")
        handle = RequestHandle(next(self._ids), listener)
        sequence = _Sequence(
            handle=handle,
            prompt_ids=list(prompt_ids),
            params=params,
            rng=np.random.default_rng(params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, self._decode_text),
            stop_filter=StopStringFilter(params.stop),
            max_new_tokens=min(params.max_tokens, room),
            seen_ids=list(prompt_ids),
            processors=tuple(processors),
            adapter=adapter,
        )
        with self._condition:
            if self._closing:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            self._waiting.append(sequence)
            self._unfinished_per_adapter[adapter] += 1
            self._stats.prompt_tokens += len(prompt_ids)
            self._condition.notify()
        return handle

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Submit and wait (convenience for scripts and tests)."""
        return self.submit(prompt_ids, params).result()

    def stats(self) -> EngineStats:
        with self._condition:
            snapshot = EngineStats(**self._stats.__dict__)
            snapshot.prefix_cache_hit_rate = self.prefix_cache.hit_rate
            snapshot.running = len(self._decoding) + len(self._prefilling)
            snapshot.waiting = len(self._waiting)
        return snapshot

    def adapters_in_use(self) -> set[int]:
        """The adapter slots of every request submitted and not finished: a slot is not reused while in this set.

        Counted at submit and at finish, not read from the queues: a request between them may be in neither."""
        with self._condition:
            return {adapter for adapter, unfinished in self._unfinished_per_adapter.items() if unfinished}

    def abort_all(self, reason: str) -> None:
        """Fail every submitted request at the next step with ``finish_reason="error"`` and ``reason`` (safe from
        any thread): how a shutdown whose drain period ran out still answers each request."""
        with self._condition:
            self._abort_reason = reason
            self._condition.notify()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop taking requests, finish the ones already submitted, then stop the thread.

        Returns:
            True when the thread ended within ``timeout``.
        """
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while (not self._waiting and not self._decoding and not self._prefilling and not self._closing
                       and self._abort_reason is None):
                    self._condition.wait()
                abort_reason, self._abort_reason = self._abort_reason, None
                if abort_reason is not None:
                    aborted, self._waiting = self._waiting + self._prefilling + self._decoding, []
                elif self._closing and not self._waiting and not self._decoding and not self._prefilling:
                    return
                free = self.max_batch_size - len(self._decoding) - len(self._prefilling)
                admitted, self._waiting = self._waiting[:free], self._waiting[free:]
            if abort_reason is not None:
                for sequence in aborted:  # _finish takes the lock itself
                    if not sequence.finished:
                        self._finish(sequence, FINISH_ERROR, error=abort_reason)
                self._prefilling, self._decoding = [], []
                continue
            for sequence in admitted:
                if not self._finish_if_cancelled(sequence):
                    self._admit(sequence)
            for sequence in self._prefilling + self._decoding:
                self._finish_if_cancelled(sequence)
            self._release_finished()
            if self._prefilling:
                self._guarded(self._prefill_chunk)
            if self._decoding:
                self._guarded(self._decode_step)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a model step; if it raises, fail every request holding a slot (not the server)."""
        try:
            step()
        except Exception as err:  # noqa: BLE001 - a bad step must not kill the engine thread
            message = f"{type(err).__name__}: {err}"
            # After a failed step the cache may be half-written, so every row in it goes too.
            for sequence in self._prefilling + self._decoding:
                if not sequence.finished:
                    self._finish(sequence, FINISH_ERROR, error=message)
            self._prefilling, self._decoding = [], []

    def _admit(self, sequence: _Sequence) -> None:
        """Give ``sequence`` the highest free slot (decoding rows keep the lowest) and queue its prompt."""
        taken = {other.slot for other in self._prefilling + self._decoding}
        sequence.slot = max(slot for slot in range(self.max_batch_size) if slot not in taken)
        self.decoder.clear(sequence.slot)
        # A request scoring its prompt needs every position's logits, so it runs the whole prompt.
        if self.prefix_cache.max_blocks and not sequence.params.prompt_logprobs:
            blocks = self.prefix_cache.lookup(sequence.prompt_ids, self.decoder.adapter_key(sequence.adapter))
            if blocks:
                columns = [np.concatenate(layer_blocks) for layer_blocks in zip(*blocks)]
                self.decoder.write_row_cache(sequence.slot, self.decoder.prefix_columns, columns)
                sequence.prefilled = len(blocks) * BLOCK_TOKENS
        self._prefilling.append(sequence)

    def _prefill_chunk(self) -> None:
        """Up to ``prefill_chunk_tokens`` prompt tokens of the prefilling requests, oldest first, in one step.

        A request that asked for prompt logprobs takes one token per step: the step returns only the last
        position's logits, and each prompt token's logprob needs the logits before it.
        """
        budget, rows, chunks = self.prefill_chunk_tokens, [], []
        for sequence in self._prefilling:
            if budget == 0:
                break
            size = 1 if sequence.params.prompt_logprobs else budget
            chunk = sequence.prompt_ids[sequence.prefilled: sequence.prefilled + size]
            rows.append(sequence)
            chunks.append(chunk)
            budget -= len(chunk)
        logits = self.decoder.prefill([s.slot for s in rows], chunks, [s.adapter for s in rows])
        with self._condition:
            self._stats.prefill_batches += 1
        for row, (sequence, chunk) in enumerate(zip(rows, chunks)):
            sequence.prefilled += len(chunk)
            prompt = sequence.prompt_ids
            if sequence.prefilled < len(prompt):
                if sequence.params.prompt_logprobs:
                    top = sequence.params.logprobs or 0
                    row_logits = logits[row][: self.sampled_vocab_size]
                    sequence.prompt_logprobs.append(token_logprob(row_logits, prompt[sequence.prefilled], top))
                continue
            self._prefilling.remove(sequence)
            self._store_prefix(sequence)
            sequence.handle.prompt_logprobs = tuple(sequence.prompt_logprobs)
            if sequence.max_new_tokens == 0:  # max_tokens 0: the prompt scored, nothing generated
                self._finish(sequence, FINISH_LENGTH)
            elif not self._accept(sequence, logits[row]):
                self._start_decoding(sequence)

    def _store_prefix(self, sequence: _Sequence) -> None:
        """Keep the cache columns of the prompt's full blocks that are not cached yet."""
        start = self.decoder.prefix_columns
        for block, link in self.prefix_cache.missing_blocks(sequence.prompt_ids, self.decoder.adapter_key(sequence.adapter)):
            first = start + block * BLOCK_TOKENS
            self.prefix_cache.store(link, self.decoder.row_cache(sequence.slot, first, first + BLOCK_TOKENS))

    def _start_decoding(self, sequence: _Sequence) -> None:
        """Move a prefilled request into the slot after the decoding rows (swapping with a prefilling one there)."""
        target = len(self._decoding)
        if sequence.slot != target:
            holder = next((other for other in self._prefilling if other.slot == target), None)
            if holder is None:
                self.decoder.move(sequence.slot, target)
            else:
                self.decoder.swap(sequence.slot, target)
                holder.slot = sequence.slot
            sequence.slot = target
        self._decoding.append(sequence)

    def _decode_step(self) -> None:
        logits = self.decoder.decode([s.last_token for s in self._decoding], [s.adapter for s in self._decoding])
        logits = logits[:, : self.sampled_vocab_size]
        # One argmax over every row costs what one row's sampling call does; rows that take it skip sample_token.
        argmaxes = np.argmax(logits, axis=1).tolist()
        with self._condition:
            self._stats.decode_steps += 1
        for row, sequence in enumerate(self._decoding):
            self._accept(sequence, logits[row], argmaxes[row] if sequence.takes_argmax else None)
        self._release_finished()

    def _release_finished(self) -> None:
        """Drop finished requests; the last decoding rows move into the holes, so the rest stay in place."""
        self._prefilling = [s for s in self._prefilling if not s.finished]
        survivors = [s for s in self._decoding if not s.finished]
        if len(survivors) == len(self._decoding):
            return
        count = len(survivors)
        holes = sorted(set(range(count)) - {s.slot for s in survivors})
        for hole, sequence in zip(holes, [s for s in survivors if s.slot >= count]):
            self.decoder.move(sequence.slot, hole)
            sequence.slot = hole
        self._decoding = sorted(survivors, key=lambda s: s.slot)
        self.decoder.shrink([s.slot for s in self._decoding + self._prefilling])

    def _finish_if_cancelled(self, sequence: _Sequence) -> bool:
        if sequence.handle.cancelled and not sequence.finished:
            self._finish(sequence, FINISH_CANCELLED)
        return sequence.finished

    def _accept(self, sequence: _Sequence, logits: np.ndarray, argmax: int | None = None) -> bool:
        """Sample the next token of ``sequence`` (``argmax``: already picked, for a row that ``takes_argmax``), emit
        its text; return True if the request is done."""
        if sequence.handle.cancelled:
            self._finish(sequence, FINISH_CANCELLED)
            return True
        params = sequence.params
        logits = logits[: self.sampled_vocab_size]
        if argmax is not None:
            token = argmax
        else:
            # The history arrays are only needed (and only worth building) when a penalty applies.
            seen = np.asarray(sequence.seen_ids, dtype="int64") if params.repetition_penalty != 1.0 else NO_TOKENS
            penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            generated = np.asarray(sequence.generated, dtype="int64") if penalised else NO_TOKENS
            allowed = logits
            for processor in sequence.processors:
                allowed = processor.process(allowed)
            token = sample_token(allowed, params, sequence.rng, seen, generated)
            for processor in sequence.processors:
                processor.accept_token(token)
        if params.logprobs is not None:
            # EOS too, although it adds no text (as vLLM): lm-eval's loglikelihood reads the prompt's logprobs as
            # all but the last entry of an echo with max_tokens=1, so that entry must exist whatever was sampled.
            sequence.last_logprob = (token_logprob(logits, token, params.logprobs),)
        if token in self.eos_token_ids:
            self._finish(sequence, FINISH_STOP, token_ids=(token,))
            return True
        sequence.generated.append(token)
        sequence.seen_ids.append(token)
        sequence.last_token = token
        self._stats.generated_tokens += 1  # only this thread writes it, so no lock (``stats`` reads a snapshot)
        text, stopped = sequence.stop_filter.push(sequence.detokenizer.push(token))
        if stopped:  # the stop string and anything after it are dropped
            self._finish(sequence, FINISH_STOP, text=text, token_ids=(token,), flush=False)
            return True
        if len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, FINISH_LENGTH, text=text, token_ids=(token,))
            return True
        sequence.handle._deliver(self._event(sequence, text, (token,), None))
        return False

    def _finish(self, sequence: _Sequence, reason: str, text: str = "", token_ids=(), error: str | None = None,
                flush: bool = True):
        if flush and reason in (FINISH_LENGTH, FINISH_STOP):
            # Text still held for an incomplete character or a possible stop string is real output.
            tail, _ = sequence.stop_filter.push(sequence.detokenizer.flush())
            text += tail + sequence.stop_filter.flush()
        sequence.finished = True
        with self._condition:
            self._stats.finished_requests += 1
            self._unfinished_per_adapter[sequence.adapter] -= 1
        sequence.handle._deliver(self._event(sequence, text, tuple(token_ids), reason, error))

    @staticmethod
    def _event(sequence: _Sequence, text: str, token_ids: tuple, reason: str | None, error: str | None = None):
        logprobs = sequence.last_logprob if token_ids else ()
        return StreamEvent(text, token_ids, reason, len(sequence.prompt_ids), len(sequence.generated), error, logprobs)
