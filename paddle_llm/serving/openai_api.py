"""The OpenAI-compatible request/response contract, shared by the REST and gRPC front ends (no web imports).

Requests are checked field by field, so a bad one gets a 400 whose message names the field (``param``), in
OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``. Responses and stream chunks are built
here too, so REST and gRPC cannot drift apart.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from paddle_llm.data.sft import prompt_ids_as_trained
from paddle_llm.models.chat_template import render_chat
from paddle_llm.models.registry import ModelFamily
from paddle_llm.serving.engine import FINISH_CANCELLED, FINISH_ERROR, Completion, EngineClosedError, RequestHandle, StreamEvent
from paddle_llm.serving.sampling import SamplingParams

MAX_STOP_STRINGS = 4
# OpenAI fields we accept but that only have one supported value here.
SINGLE_VALUE_FIELDS = {"n": 1, "best_of": 1, "echo": False}


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP status / gRPC code with an OpenAI-style JSON body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.error_type, self.code = message, param, status, error_type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits the server enforces.

    Attributes:
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: the longest prompt accepted (at most the context length).
        default_max_tokens: used when a request gives no ``max_tokens``.
    """

    max_tokens_limit: int
    max_prompt_tokens: int
    default_max_tokens: int


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready for the engine."""

    kind: str  # "completion" or "chat"
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_json_body(raw: bytes) -> dict:
    """Raises: RequestError for a body that is not a JSON object."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    return kind(value)


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


class OpenAIProtocol:
    """Validates OpenAI-style bodies for one served model and builds responses."""

    def __init__(self, model_name: str, family: ModelFamily, tokenizer, max_context_length: int, limits: ServingLimits):
        self.model_name = model_name
        self.family = family
        self.tokenizer = tokenizer
        self.max_context_length = max_context_length
        self.limits = limits

    def encode(self, messages: list[dict], templated: bool) -> list[int]:
        """Encode a request exactly as fine-tuning framed its prompts (see ``data.sft.prompt_ids_as_trained``)."""
        return prompt_ids_as_trained(self.family, self.tokenizer, messages, templated)

    def _check_common(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               param="model", status=404, code="model_not_found")
        for name, only in SINGLE_VALUE_FIELDS.items():
            if body.get(name) not in (None, only):
                raise RequestError(f"{name} must be {json.dumps(only)} (the only supported value)", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise RequestError(f"{name} is not supported; use repetition_penalty", param=name)
        if body.get("logprobs") not in (None, False, 0):
            raise RequestError("logprobs is not supported", param="logprobs")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError("stream must be true or false", param="stream")

    def _sampling(self, body: dict, prompt_tokens: int, prompt_param: str, extra_stop=()) -> SamplingParams:
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens; this server accepts at most {self.limits.max_prompt_tokens}",
                param=prompt_param, code="context_length_exceeded")
        room = self.max_context_length - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt has {prompt_tokens} tokens, filling the model's context of "
                               f"{self.max_context_length}", param=prompt_param, code="context_length_exceeded")
        requested = _number(body, "max_tokens", int, None)
        if requested is None:
            requested = _number(body, "max_completion_tokens", int, None)
        if requested is not None:
            if requested < 1:
                raise RequestError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
            if requested > self.limits.max_tokens_limit:
                raise RequestError(f"max_tokens {requested} is over this server's limit of "
                                   f"{self.limits.max_tokens_limit}", param="max_tokens")
            if requested > room:
                raise RequestError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) exceeds the "
                                   f"model's context of {self.max_context_length}", param="max_tokens",
                                   code="context_length_exceeded")
            max_tokens = requested
        else:
            max_tokens = min(self.limits.default_max_tokens, self.limits.max_tokens_limit, room)
        user_stop = _stop_strings(body)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", float, 1.0),
            top_k=_number(body, "top_k", int, 0),
            top_p=_number(body, "top_p", float, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", float, 1.0),
            stop=user_stop + tuple(s for s in extra_stop if s not in user_stop),
            seed=_number(body, "seed", int, None),
        )
        try:
            params.validate()
        except ValueError as err:
            raise RequestError(str(err), param=str(err).split(" ", 1)[0]) from None
        return params

    @staticmethod
    def _stream_flags(body: dict) -> tuple[bool, bool]:
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        return bool(body.get("stream", False)), bool(options.get("include_usage", False))

    def prepare_completion(self, body: dict) -> PreparedRequest:
        """Validate a ``/v1/completions`` body. Raises: RequestError."""
        self._check_common(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", param="prompt")
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        prompt_ids = self.encode([{"role": "user", "content": prompt}], templated=False)
        params = self._sampling(body, len(prompt_ids), "prompt")
        return PreparedRequest("completion", prompt_ids, params, *self._stream_flags(body))

    def prepare_chat(self, body: dict) -> PreparedRequest:
        """Validate a ``/v1/chat/completions`` body and render it with the model's chat template. Raises: RequestError."""
        self._check_common(body)
        messages = body.get("messages")
        if messages is None:
            raise RequestError("messages is required", param="messages")
        try:
            render_chat(self.family.chat_template, messages, add_generation_prompt=True)  # validates, naming the bad field
            prompt_ids = self.encode(list(messages), templated=True)
        except ValueError as err:
            raise RequestError(str(err), param="messages") from None
        # The template's own round markers end a reply (ChatGLM starts a new "[Round N]" otherwise).
        params = self._sampling(body, len(prompt_ids), "messages", extra_stop=self.family.chat_template.stop_strings)
        return PreparedRequest("chat", prompt_ids, params, *self._stream_flags(body))

    # ---- responses -----------------------------------------------------------------------------------------------

    @staticmethod
    def new_id(kind: str) -> str:
        return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def response(self, kind: str, request_id: str, completion: Completion) -> dict:
        """The non-streamed response body."""
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                      "finish_reason": completion.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}
        return {
            "id": request_id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": self.usage(completion.prompt_tokens, completion.completion_tokens),
        }

    def chunk(self, kind: str, request_id: str, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        """One streamed chunk: ``chat.completion.chunk`` with a ``delta``, or a ``text_completion`` piece."""
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": text or ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            object_name = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            object_name = "text_completion"
        return {"id": request_id, "object": object_name, "created": int(time.time()), "model": self.model_name,
                "choices": [choice]}

    def usage_chunk(self, kind: str, request_id: str, event: StreamEvent) -> dict:
        """The extra last chunk asked for with ``stream_options.include_usage``."""
        chunk = self.chunk(kind, request_id, None, None)
        chunk["choices"] = []
        chunk["usage"] = self.usage(event.prompt_tokens, event.completion_tokens)
        return chunk

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "paddle_llm"}]}


def check_finished(event: StreamEvent) -> None:
    """Raises: RequestError (500) when the engine failed the request."""
    if event.finish_reason == FINISH_ERROR:
        raise RequestError(f"generation failed: {event.error}", status=500, error_type="server_error")


class LocalBackend:
    """The protocol plus a local ``Engine``: what the REST and gRPC front ends call."""

    def __init__(self, served, limits: ServingLimits):
        self.served = served
        self.protocol = OpenAIProtocol(served.name, served.family, served.tokenizer,
                                       served.max_context_length, limits)

    @property
    def model_name(self) -> str:
        return self.served.name

    def prepare(self, kind: str, body: dict) -> PreparedRequest:
        return self.protocol.prepare_chat(body) if kind == "chat" else self.protocol.prepare_completion(body)

    def submit(self, prepared: PreparedRequest, listener=None) -> RequestHandle:
        """Raises: RequestError 503 while shutting down."""
        try:
            return self.served.engine.submit(prepared.prompt_ids, prepared.params, listener)
        except EngineClosedError as err:
            raise RequestError(str(err), status=503, error_type="server_error") from None

    def stream(self, kind: str, body: dict) -> "EventStream":
        """Validate and submit; the result yields events (blocking) and can be cancelled from any thread.

        Raises:
            RequestError: invalid request, before anything is generated.
        """
        return EventStream(self.submit(self.prepare(kind, body)))


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
