"""``LocalBackend``: the OpenAI endpoints' validation over a local ``Engine``, what the REST and gRPC front ends call.

Its ``stream(kind, body)`` and ``model_name`` are the whole interface gRPC needs, which ``fastdeploy.FastDeployBackend``
provides too; the REST routers also use ``endpoint`` and ``submit`` to stream without a thread per request.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import replace
from typing import Iterator

from paddle_llm.serving.engine import FINISH_CANCELLED, EngineClosedError, RequestHandle, StreamEvent
from paddle_llm.serving.grammar import GrammarError, GrammarVocabulary
from paddle_llm.serving.openai.chat.protocol import ChatProtocol
from paddle_llm.serving.openai.completions.protocol import CompletionsProtocol
from paddle_llm.serving.openai.protocol import EndpointProtocol, PreparedRequest, RequestError, ServingLimits


class LocalBackend:
    """The endpoint protocols for one served model, plus its engine."""

    def __init__(self, served, limits: ServingLimits):
        self.served = served
        self.endpoints: dict[str, EndpointProtocol] = {
            protocol.kind: protocol(served.name, served.family, served.tokenizer, served.max_context_length, limits)
            for protocol in (CompletionsProtocol, ChatProtocol)
        }
        # The vocabulary constrained decoding reads takes up to a second for a 150k-token tokenizer: built here on a
        # thread of its own, so the first response_format or tools request does not stall the event loop with it.
        self._grammar_vocabulary: GrammarVocabulary | GrammarError | None = None
        self._vocabulary_built = threading.Thread(target=self._build_grammar_vocabulary, daemon=True,
                                                  name="paddle-llm-grammar-vocabulary")
        self._vocabulary_built.start()

    @property
    def model_name(self) -> str:
        return self.served.name

    def endpoint(self, kind: str) -> EndpointProtocol:
        """The protocol of the ``"completion"`` or ``"chat"`` endpoint."""
        return self.endpoints[kind]

    def prepare(self, kind: str, body: dict) -> PreparedRequest:
        """Validate a request for the base model or, when ``model`` names one, a LoRA adapter.

        Raises:
            RequestError: invalid request; 404 for a model that is neither.
        """
        adapter = self._adapter_named(body.get("model"))
        prepared = self.endpoint(kind).prepare(self.on_base_model(body))
        return prepared if adapter is None else replace(prepared, adapter=adapter)

    def on_base_model(self, body: dict) -> dict:
        """``body`` with an adapter's name as ``model`` replaced by the base's (they share the tokenizer and the
        limits). Raises: RequestError 404 for a model that is neither."""
        return body if self._adapter_named(body.get("model")) is None else {**body, "model": self.model_name}

    def _adapter_named(self, model) -> str | None:
        adapters = self.served.adapters
        if adapters is None or model is None or model == self.model_name:
            return None
        names = adapters.names()
        if model not in names:
            served = ", ".join(repr(name) for name in [self.model_name] + names)
            raise RequestError(f"model {model!r} is not served here; this server serves {served}", param="model",
                               status=404, code="model_not_found")
        return model

    def submit(self, prepared: PreparedRequest, listener_for=None) -> list[RequestHandle]:
        """Submit every choice of a request (``n`` per prompt), in choice-index order.

        Args:
            listener_for: ``index -> listener`` for each choice's events (None: iterable handles).

        Raises:
            RequestError: 503 while shutting down (choices already submitted are cancelled).
        """
        handles = []
        choices = prepared.choices()
        processors = [self._grammar_constraints(prepared) for _ in choices]
        held = nullcontext(0) if prepared.adapter is None else self.served.adapters.slot_for(prepared.adapter)
        try:
            with held as slot:
                for index, (prompt, params) in enumerate(choices):
                    listener = None if listener_for is None else listener_for(index)
                    handles.append(self.served.engine.submit(prompt.ids, params, listener, processors[index], slot))
        except EngineClosedError as err:
            for handle in handles:
                handle.cancel()
            raise RequestError(str(err), status=503, error_type="server_error") from None
        return handles

    def _grammar_constraints(self, prepared: PreparedRequest) -> tuple:
        """One choice's own grammar matcher (none for free text).

        Raises:
            RequestError: naming response_format or tools: the tokenizer cannot be constrained, or the grammar cannot
                be built over its vocabulary.
        """
        if prepared.grammar is None:
            return ()
        self._vocabulary_built.join()
        try:
            if isinstance(self._grammar_vocabulary, GrammarError):
                raise self._grammar_vocabulary
            return (self._grammar_vocabulary.constraint(prepared.grammar),)
        except GrammarError as err:
            param = "response_format" if prepared.tools is None else "tools"
            raise RequestError(f"{param}: {err}", param=param) from None

    def _build_grammar_vocabulary(self) -> None:
        try:
            self._grammar_vocabulary = GrammarVocabulary(self.served.tokenizer, sorted(self.served.engine.eos_token_ids))
        except GrammarError as err:  # this tokenizer cannot be constrained: each such request is told why
            self._grammar_vocabulary = err
        except Exception as err:  # noqa: BLE001 - nor can it when llguidance fails on it; plain requests go on
            self._grammar_vocabulary = GrammarError(f"the tokenizer's vocabulary could not be read for constrained "
                                                    f"decoding: {type(err).__name__}: {err}")

    def stream(self, kind: str, body: dict) -> "EventStream":
        """Validate and submit; the result yields events (blocking) and can be cancelled from any thread.

        Raises:
            RequestError: invalid request, before anything is generated.
        """
        prepared = self.prepare(kind, body)
        if len(prepared.choices()) != 1:  # gRPC's GenerateRequest has one prompt and no n
            raise RequestError("this front end returns one choice per request", param="n")
        return EventStream(self.submit(prepared)[0])


class EventStream:
    """A request's events as a blocking iterator; leaving the loop early or ``cancel()`` frees its batch slot."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle

    def cancel(self) -> None:
        self.handle.cancel()

    def __iter__(self) -> Iterator[StreamEvent]:
        finished = False
        try:
            for event in self.handle:
                finished = event.finish_reason is not None
                if event.finish_reason != FINISH_CANCELLED:
                    yield event
        finally:
            if not finished:
                self.handle.cancel()
