"""What every OpenAI endpoint shares, for the REST and gRPC front ends alike (no web imports).

Requests are checked field by field, so a bad one gets a 400 whose message names the field (``param``), in
OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``. ``EndpointProtocol`` holds the checks and
response envelopes both generate endpoints use; ``completions.protocol`` and ``chat.protocol`` say only where the two
differ (how the prompt is read, how a choice is shaped), so REST and gRPC, completions and chat, cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass

from paddle_llm.data.sft import prompt_ids_as_trained
from paddle_llm.models.registry import ModelFamily
from paddle_llm.serving.engine import FINISH_ERROR, Completion, StreamEvent
from paddle_llm.serving.sampling import SamplingParams

MAX_STOP_STRINGS = 4

# The fields both generate endpoints honour; each endpoint adds its own (``EndpointProtocol.own_fields``). A field in
# neither is refused with a 400 naming it, so nothing a client asks for is ever silently ignored.
COMMON_FIELDS = {
    "model": "must be the served model's id (404 otherwise)",
    "max_tokens": "most new tokens, up to --max_tokens_limit",
    "temperature": "0 (greedy) to 2",
    "top_p": "nucleus sampling, (0, 1]",
    "top_k": "keep the k most likely tokens (0 = all); not in OpenAI's API",
    "repetition_penalty": "CTRL-style penalty, (0, 10]; not in OpenAI's API",
    "stop": "up to 4 strings",
    "seed": "reproducible sampling",
    "stream": "server-sent events",
    "stream_options": "include_usage only",
}
# Fields OpenAI defines that this server does not implement, refused by name with what to do instead. A null value
# counts as absent, as OpenAI treats it.
REFUSED_FIELDS = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output (json_object, json_schema) is not supported",
    "suffix": "suffix (fill in the middle) is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "echo": "echo is not supported",
    "n": "only one choice per request is supported",
    "best_of": "best_of is not supported",
    "presence_penalty": "presence_penalty is not supported; use repetition_penalty",
    "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty",
    "logit_bias": "logit_bias is not supported",
}
STREAM_OPTIONS = ("include_usage",)


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP status / gRPC code with an OpenAI-style JSON body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.error_type, self.code = message, param, status, error_type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def parse_json_body(raw: bytes) -> dict:
    """Raises: RequestError for a body that is not a JSON object."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def bearer_token_matches(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` value (HTTP header or gRPC metadata) is ``Bearer <api_key>``, compared in
    constant time so the key cannot be guessed byte by byte from response times."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def check_finished(event: StreamEvent) -> None:
    """Raises: RequestError (500) when the engine failed the request."""
    if event.finish_reason == FINISH_ERROR:
        raise RequestError(f"generation failed: {event.error}", status=500, error_type="server_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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


class EndpointProtocol:
    """One generate endpoint's contract for one served model: validating a body, building responses and chunks.

    A subclass names its endpoint (the class attributes below) and supplies ``_prompt_ids`` and ``_content``;
    everything else (the model check, sampling fields, limits, the response envelope, usage) is shared here.
    """

    own_fields: dict[str, str]  # the fields this endpoint honours besides COMMON_FIELDS, and what they do
    kind: str  # "completion" or "chat": how gRPC and the backend pick an endpoint
    path: str  # the REST route, also the ``endpoint`` label of the request metrics
    prompt_param: str  # the field a too-long prompt is blamed on
    id_prefix: str
    response_object: str
    chunk_object: str

    def __init__(self, model_name: str, family: ModelFamily, tokenizer, max_context_length: int, limits: ServingLimits):
        self.model_name = model_name
        self.family = family
        self.tokenizer = tokenizer
        self.max_context_length = max_context_length
        self.limits = limits

    # ---- requests ------------------------------------------------------------------------------------------------

    def prepare(self, body: dict) -> PreparedRequest:
        """Validate a request body. Raises: RequestError naming the bad field."""
        self._check_fields(body)
        self._check_model(body)
        prompt_ids = self._prompt_ids(body)
        params = self._sampling(body, len(prompt_ids), self._extra_stop())
        return PreparedRequest(self.kind, prompt_ids, params, *self._stream_flags(body))

    def _prompt_ids(self, body: dict) -> list[int]:
        """The prompt's token ids. Raises: RequestError."""
        raise NotImplementedError

    def _extra_stop(self) -> tuple[str, ...]:
        """Stop strings this endpoint adds to the request's own."""
        return ()

    def encode(self, messages: list[dict], templated: bool) -> list[int]:
        """Encode a request exactly as fine-tuning framed its prompts (see ``data.sft.prompt_ids_as_trained``)."""
        return prompt_ids_as_trained(self.family, self.tokenizer, messages, templated)

    @classmethod
    def fields(cls) -> dict[str, str]:
        """Every field this endpoint honours, and what it does: the table a request is checked against."""
        return {**COMMON_FIELDS, **cls.own_fields}

    def _check_fields(self, body: dict) -> None:
        """Raises: RequestError naming the first field this endpoint does not honour."""
        accepted = self.fields()
        for name, value in body.items():
            if name in accepted or value is None:
                continue
            if name in REFUSED_FIELDS:
                raise RequestError(f"{name}: {REFUSED_FIELDS[name]}", param=name, code="unsupported_field")
            raise RequestError(f"{name} is not a field {self.path} takes; it takes {', '.join(accepted)}",
                               param=name, code="unknown_field")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError("stream must be true or false", param="stream")

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               param="model", status=404, code="model_not_found")

    def _sampling(self, body: dict, prompt_tokens: int, extra_stop: tuple[str, ...]) -> SamplingParams:
        prompt_param = self.prompt_param
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
        for name in options:
            if name not in STREAM_OPTIONS:
                raise RequestError(f"stream_options.{name} is not supported; it takes {', '.join(STREAM_OPTIONS)}",
                                   param=f"stream_options.{name}")
        return bool(body.get("stream", False)), bool(options.get("include_usage", False))

    # ---- responses -----------------------------------------------------------------------------------------------

    def new_id(self) -> str:
        return self.id_prefix + uuid.uuid4().hex[:24]

    def _content(self, text: str | None, streamed: bool) -> dict:
        """A choice's payload: the whole text (``streamed=False``) or one streamed piece (None: nothing new)."""
        raise NotImplementedError

    @staticmethod
    def _choice(content: dict, finish_reason: str | None) -> dict:
        return {"index": 0, **content, "finish_reason": finish_reason, "logprobs": None}

    def _envelope(self, object_name: str, request_id: str, choices: list[dict]) -> dict:
        return {"id": request_id, "object": object_name, "created": int(time.time()), "model": self.model_name,
                "choices": choices}

    def response(self, request_id: str, completion: Completion) -> dict:
        """The non-streamed response body."""
        choice = self._choice(self._content(completion.text, streamed=False), completion.finish_reason)
        body = self._envelope(self.response_object, request_id, [choice])
        body["usage"] = usage(completion.prompt_tokens, completion.completion_tokens)
        return body

    def opening_chunk(self, request_id: str) -> dict | None:
        """A chunk sent before any text (None: this endpoint has none)."""
        return None

    def chunk(self, request_id: str, text: str | None, finish_reason: str | None) -> dict:
        """One streamed chunk: a piece of text, or (``text=None``) just the finish reason."""
        return self._envelope(self.chunk_object, request_id,
                              [self._choice(self._content(text, streamed=True), finish_reason)])

    def usage_chunk(self, request_id: str, event: StreamEvent) -> dict:
        """The extra last chunk asked for with ``stream_options.include_usage``."""
        chunk = self._envelope(self.chunk_object, request_id, [])
        chunk["usage"] = usage(event.prompt_tokens, event.completion_tokens)
        return chunk
