"""What every OpenAI endpoint shares, for the REST and gRPC front ends alike (no web imports).

Requests are checked field by field against each endpoint's table of the fields it honours (``COMMON_FIELDS`` plus
its own), so an unknown or unsupported field, or a bad value, gets a 400 whose message names the field (``param``),
in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``. ``EndpointProtocol`` holds the checks and
response envelopes both generate endpoints use; ``completions.protocol`` and ``chat.protocol`` say only where the two
differ (how the prompt is read, how a choice is shaped), so REST and gRPC, completions and chat, cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field, replace

from paddle_llm.data.sft import prompt_ids_as_trained
from paddle_llm.models.registry import ModelFamily
from paddle_llm.serving.engine import FINISH_ERROR, StreamEvent, TokenLogprob
from paddle_llm.serving.sampling import SamplingParams
from paddle_llm.serving.text_stream import text_decoder, token_piece

MAX_STOP_STRINGS = 4
MAX_CHOICES = 64  # prompts x n in one request: each is a batch row

# The fields both generate endpoints honour; each endpoint adds its own (``EndpointProtocol.own_fields``). A field in
# neither is refused with a 400 naming it, so nothing a client asks for is ever silently ignored.
COMMON_FIELDS = {
    "model": "the served model's id or a LoRA adapter's name (404 otherwise)",
    "max_tokens": "most new tokens, up to --max_tokens_limit; 0 only with echo (completions): the prompt scored",
    "temperature": "0 (greedy) to 2",
    "top_p": "nucleus sampling, (0, 1]",
    "top_k": "keep the k most likely tokens (0 = all); not in OpenAI's API",
    "repetition_penalty": "CTRL-style penalty, (0, 10]; not in OpenAI's API",
    "stop": "up to 4 strings",
    "seed": "reproducible sampling",
    "stream": "server-sent events",
    "stream_options": "include_usage only",
    "n": f"choices per prompt, 1 to {MAX_CHOICES}; with a seed, choice i samples with seed + i",
    "presence_penalty": "OpenAI's, [-2, 2], on generated tokens",
    "frequency_penalty": "OpenAI's, [-2, 2], on generated tokens",
    "logit_bias": "token id -> bias in [-100, 100], added to the raw logits",
}
# Fields OpenAI defines that this server does not implement, refused by name with what to do instead. A null value
# counts as absent, as OpenAI treats it.
REFUSED_FIELDS = {
    "tools": "tool calling is only supported by /v1/chat/completions",
    "tool_choice": "tool calling is only supported by /v1/chat/completions",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is only supported by /v1/chat/completions",
    "response_format": "structured output (json_object, json_schema) is only supported by /v1/chat/completions",
    "suffix": "suffix (fill in the middle) is not supported",
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
class Prompt:
    """One prompt of a request: its ids, and its text when given as text (what ``echo`` returns)."""

    ids: list[int]
    text: str | None = None


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready for the engine: ``n`` choices for each prompt.

    Attributes:
        echo: completions put the prompt in front of each choice's text (and its logprobs).
        grammar: llguidance's grammar every choice's output must match (``serving.grammar``); None: free text.
        tools: chat's ``ToolRequest`` (``chat.tools``), whose calls are read back out of each reply; None: no tools.
    """

    kind: str  # "completion" or "chat"
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    grammar: str | None = None
    tools: object | None = None
    adapter: str | None = None  # the LoRA adapter named as ``model`` (None: the base model)

    def choices(self) -> list[tuple[Prompt, SamplingParams]]:
        """Each choice's prompt and sampling, in choice-index order (prompt by prompt, as OpenAI numbers them)."""
        return [(prompt, self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + i))
                for prompt in self.prompts for i in range(self.n)]


@dataclass
class ChoiceOutput:
    """What one choice produced, gathered from its engine events."""

    index: int
    prompt: Prompt
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    completion_tokens: int = 0


def number_field(body: dict, name: str, kind: type, default):
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


def check_fields(body: dict, accepted: dict[str, str], path: str) -> None:
    """Raises: RequestError naming the first field of ``body`` not in ``accepted`` (a null one counts as absent)."""
    for name, value in body.items():
        if name in accepted or value is None:
            continue
        if name in REFUSED_FIELDS:
            raise RequestError(f"{name}: {REFUSED_FIELDS[name]}", param=name, code="unsupported_field")
        raise RequestError(f"{name} is not a field {path} takes; it takes {', '.join(accepted)}",
                           param=name, code="unknown_field")


class EndpointProtocol:
    """One generate endpoint's contract for one served model: validating a body, building responses and chunks.

    A subclass names its endpoint and its own fields (the class attributes below) and supplies ``prompts``,
    ``_logprobs``, ``_content`` and ``_choice_logprobs``; everything else (the field table check, the model check,
    sampling fields, limits, choices, the response envelope, usage) is shared here.
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
        # A model with a sliding attention window serves at most that many positions: the refusal names the field.
        self.context_note = (f" (its positions, or its {family.window_field} if it has a shorter one: paddle_llm's "
                             "attention has no window)") if family.window_field else ""
        self.limits = limits
        self._decode_text = None
        self._longest_token_chars: int | None = None

    # ---- requests ------------------------------------------------------------------------------------------------

    def prepare(self, body: dict) -> PreparedRequest:
        """Validate a request body. Raises: RequestError naming the bad field."""
        check_fields(body, self.fields(), self.path)
        if not isinstance(body.get("stream", False), bool):
            raise RequestError("stream must be true or false", param="stream")
        self.check_model(body)
        prompts = self.prompts(body)
        n = number_field(body, "n", int, 1)
        if not 1 <= n <= MAX_CHOICES or len(prompts) * n > MAX_CHOICES:
            raise RequestError(f"n must be in [1, {MAX_CHOICES}] and prompts x n at most {MAX_CHOICES}; got n={n} "
                               f"for {len(prompts)} prompt(s)", param="n")
        params = self._sampling(body, max(len(p.ids) for p in prompts), self._extra_stop())
        return PreparedRequest(self.kind, prompts, params, *self._stream_flags(body), n=n, echo=self._echo(body),
                               grammar=self._grammar(body))

    def prompts(self, body: dict) -> list[Prompt]:
        """The request's prompts, encoded. Raises: RequestError naming the prompt field."""
        raise NotImplementedError

    def _logprobs(self, body: dict) -> int | None:
        """How many top alternatives each token's logprob comes with (None: no logprobs)."""
        raise NotImplementedError

    def _echo(self, body: dict) -> bool:
        return False

    def _grammar(self, body: dict) -> str | None:
        """The grammar the output must match (None: free text)."""
        return None

    def check_text_length(self, characters: int) -> None:
        """Refuse, before tokenizing it, a prompt longer than ``max_prompt_tokens`` tokens could ever spell (a
        megabyte prompt takes seconds to tokenize, only to be refused). Raises: RequestError."""
        if self._longest_token_chars is None:
            self._longest_token_chars = max((len(piece) for piece in self.tokenizer.get_vocab()), default=1)
        most = self.limits.max_prompt_tokens * self._longest_token_chars
        if characters > most:
            raise RequestError(f"the prompt has {characters} characters; this server accepts at most "
                               f"{self.limits.max_prompt_tokens} tokens, which no text over {most} characters fits",
                               param=self.prompt_param, code="context_length_exceeded")

    def check_token_ids(self, ids, param: str) -> list[int]:
        """Raises: RequestError unless ``ids`` is a non-empty list of this tokenizer's token ids."""
        vocab = len(self.tokenizer)
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise RequestError(f"{param} must be a non-empty list of token ids in [0, {vocab})", param=param)
        return ids

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

    def check_model(self, body: dict) -> None:
        """Raises: RequestError 404 when ``model`` names another model."""
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
                               f"{self.max_context_length}{self.context_note}", param=prompt_param, code="context_length_exceeded")
        requested = number_field(body, "max_tokens", int, None)
        if requested is None:
            requested = number_field(body, "max_completion_tokens", int, None)
        if requested is not None:
            if requested < 1 and not (requested == 0 and self._echo(body)):
                raise RequestError(f"max_tokens must be at least 1 (0 only with echo: true on /v1/completions, which "
                                   f"returns the prompt and its logprobs), got {requested}", param="max_tokens")
            if requested > self.limits.max_tokens_limit:
                raise RequestError(f"max_tokens {requested} is over this server's limit of "
                                   f"{self.limits.max_tokens_limit}", param="max_tokens")
            if requested > room:
                raise RequestError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) exceeds the "
                                   f"model's context of {self.max_context_length}{self.context_note}", param="max_tokens",
                                   code="context_length_exceeded")
            max_tokens = requested
        else:
            max_tokens = min(self.limits.default_max_tokens, self.limits.max_tokens_limit, room)
        user_stop = _stop_strings(body)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=number_field(body, "temperature", float, 1.0),
            top_k=number_field(body, "top_k", int, 0),
            top_p=number_field(body, "top_p", float, 1.0),
            repetition_penalty=number_field(body, "repetition_penalty", float, 1.0),
            stop=user_stop + tuple(s for s in extra_stop if s not in user_stop),
            seed=number_field(body, "seed", int, None),
            presence_penalty=number_field(body, "presence_penalty", float, 0.0),
            frequency_penalty=number_field(body, "frequency_penalty", float, 0.0),
            logit_bias=self._logit_bias(body),
            logprobs=self._logprobs(body),
        )
        params = replace(params, prompt_logprobs=self._echo(body) and params.logprobs is not None)
        try:
            params.validate()
        except ValueError as err:
            raise RequestError(str(err), param=str(err).split(" ", 1)[0]) from None
        return params

    def _logit_bias(self, body: dict) -> tuple[tuple[int, float], ...]:
        bias = body.get("logit_bias")
        if bias is None:
            return ()
        if not isinstance(bias, dict):
            raise RequestError("logit_bias must be an object mapping token ids to biases", param="logit_bias")
        pairs = []
        for key, value in bias.items():
            if not str(key).isdigit() or int(key) >= len(self.tokenizer):
                raise RequestError(f"logit_bias key {key!r} is not a token id in [0, {len(self.tokenizer)})",
                                   param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"logit_bias[{key}] must be a number, got {value!r}", param="logit_bias")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

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

    def _envelope(self, object_name: str, request_id: str, prepared: PreparedRequest, choices: list[dict]) -> dict:
        # An adapter's request is answered under the adapter's name, as vLLM does.
        return {"id": request_id, "object": object_name, "created": int(time.time()),
                "model": prepared.adapter or self.model_name, "choices": choices}

    def decode(self, ids: list[int]) -> str:
        if self._decode_text is None:  # built on first use: it imports PaddleNLP
            self._decode_text = text_decoder(self.tokenizer)
        return self._decode_text(ids)

    def _pieces(self, context: list[int], entries) -> list[tuple[TokenLogprob, str, list[tuple[str, float]]]]:
        """Each logprob entry with its token's text and its alternatives' texts, each decoded after ``context``
        (SentencePiece spells a word's leading space only after another token)."""
        context, out = list(context), []
        for entry in entries:
            top = [(token_piece(self.decode, context, token_id), logprob) for token_id, logprob in entry.top]
            out.append((entry, token_piece(self.decode, context, entry.token_id), top))
            context.append(entry.token_id)
        return out

    def _choice_logprobs(self, entries, context: list[int], prompt_entries, text_offset: int) -> dict:
        """A choice's (or one chunk's) ``logprobs`` object, in this endpoint's shape.

        Args:
            entries: the generated tokens' ``TokenLogprob``s.
            context: the ids before the first entry.
            prompt_entries: with ``echo``, the prompt's (its first token has none), else None.
            text_offset: where the first entry's text starts in the choice's text.
        """
        raise NotImplementedError

    def _choice(self, prepared: PreparedRequest, choice: ChoiceOutput, text: str | None, entries, context: list[int],
                streamed: bool, first: bool, finish_reason: str | None, text_offset: int = 0) -> dict:
        """One choice of a response, or (``streamed``) its part of a chunk; ``first``: the choice's first part."""
        echo_prompt = first and prepared.echo
        logprobs = None
        if prepared.params.logprobs is not None:
            prompt_entries = choice.prompt_logprobs if echo_prompt else None
            logprobs = self._choice_logprobs(entries, context, prompt_entries, text_offset)
        if echo_prompt:
            text = self.prompt_text(choice.prompt) + (text or "")
        return {"index": choice.index, **self._content(text, streamed), "logprobs": logprobs,
                "finish_reason": finish_reason}

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.decode(prompt.ids)

    def response(self, request_id: str, prepared: PreparedRequest, choices: list[ChoiceOutput]) -> dict:
        """The non-streamed response body."""
        body = self._envelope(self.response_object, request_id, prepared, [
            self._choice(prepared, c, c.text, c.logprobs, c.prompt.ids, False, True, c.finish_reason) for c in choices])
        body["usage"] = usage(*_usage_counts(prepared, choices))
        return body

    def opening_chunk(self, request_id: str, prepared: PreparedRequest, choice: ChoiceOutput) -> dict | None:
        """A chunk sent before any text (None: this endpoint has none)."""
        return None

    def chunk(self, request_id: str, prepared: PreparedRequest, choice: ChoiceOutput, event: StreamEvent | None,
              first: bool, text_offset: int) -> dict:
        """One streamed chunk: a piece of text with its logprobs, or (``event=None``) just the finish reason.
        ``choice`` already holds the event's tokens; ``text_offset`` is where the event's text starts."""
        if event is None:
            return self._envelope(self.chunk_object, request_id, prepared, [
                {"index": choice.index, **self._content(None, True), "logprobs": None,
                 "finish_reason": choice.finish_reason}])
        context = choice.prompt.ids + choice.token_ids[:len(choice.token_ids) - len(event.token_ids)]
        return self._envelope(self.chunk_object, request_id, prepared, [
            self._choice(prepared, choice, event.text, event.logprobs, context, True, first, None, text_offset)])

    def chunks(self, request_id: str, prepared: PreparedRequest, choice: ChoiceOutput, event: StreamEvent | None,
               first: bool, text_offset: int) -> list[dict]:
        """What a stream sends for an event (or, ``event=None``, for the finish): ``chunk``'s one chunk here; an
        endpoint may hold text back or send several."""
        return [self.chunk(request_id, prepared, choice, event, first, text_offset)]

    def usage_chunk(self, request_id: str, prepared: PreparedRequest, choices: list[ChoiceOutput]) -> dict:
        """The extra last chunk asked for with ``stream_options.include_usage``."""
        chunk = self._envelope(self.chunk_object, request_id, prepared, [])
        chunk["usage"] = usage(*_usage_counts(prepared, choices))
        return chunk


def _usage_counts(prepared: PreparedRequest, choices: list[ChoiceOutput]) -> tuple[int, int]:
    # A prompt is read once however many choices it has, as OpenAI counts it.
    return sum(len(p.ids) for p in prepared.prompts), sum(c.completion_tokens for c in choices)
