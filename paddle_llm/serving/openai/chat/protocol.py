"""``/v1/chat/completions``: messages rendered with the model's chat template, ``chat.completion`` objects out."""

from __future__ import annotations

from dataclasses import replace

from paddle_llm.models.chat_template import render_chat, render_jinja_tool_chat, renders_tools
from paddle_llm.serving.openai.chat.response_format import response_format_grammar
from paddle_llm.serving.openai.chat.tools import ToolRequest, parse_tool_calls, read_tool_request
from paddle_llm.serving.openai.protocol import (
    EndpointProtocol,
    PreparedRequest,
    Prompt,
    RequestError,
    number_field,
)
from paddle_llm.serving.sampling import MAX_TOP_LOGPROBS


class ChatProtocol(EndpointProtocol):
    own_fields = {"messages": "system (or developer), user and assistant turns, rendered with the model's chat "
                              "template; content a string or a list of text parts",
                  "max_completion_tokens": "the same as max_tokens",
                  "logprobs": "true: each token's logprob",
                  "top_logprobs": f"0 to {MAX_TOP_LOGPROBS} most likely alternatives per token (needs logprobs)",
                  "response_format": "text, json_object or json_schema; JSON is enforced by constrained decoding",
                  "tools": "functions the model may call, rendered by the model's own chat template",
                  "tool_choice": "none, auto, required or one named function (the last two by constrained decoding)",
                  "parallel_tool_calls": "false: at most one call per reply"}
    kind = "chat"
    path = "/v1/chat/completions"
    prompt_param = "messages"
    id_prefix = "chatcmpl-"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def prepare(self, body: dict) -> PreparedRequest:
        tools = read_tool_request(body, self._tool_template())
        prepared = super().prepare(body)
        if tools is None:
            return prepared
        if prepared.grammar is not None:
            raise RequestError("response_format cannot be combined with tools", param="response_format")
        if prepared.params.logprobs is not None and tools.parses_calls:
            raise RequestError("logprobs are not supported together with tools", param="logprobs")
        return replace(prepared, grammar=tools.grammar(), tools=tools)

    def _tool_template(self) -> str | None:
        """The served model's Jinja chat_template when it renders tools, else None."""
        template = getattr(self.tokenizer, "jinja_chat_template", None)
        return template if template and renders_tools(template) else None

    def prompts(self, body: dict) -> list[Prompt]:
        messages = body.get("messages")
        if messages is None:
            raise RequestError("messages is required", param="messages")
        messages = _plain_messages(messages)
        if isinstance(messages, list):
            self.check_text_length(sum(len(m.get("content")) for m in messages
                                       if isinstance(m, dict) and isinstance(m.get("content"), str)))
        template = self._tool_template()
        if template and (body.get("tools") is not None or _has_tool_turns(messages)):
            return [self._tool_prompt(template, messages, body.get("tools"))]
        try:
            render_chat(self.family.chat_template, messages, add_generation_prompt=True)  # validates, naming the bad field
            return [Prompt(self.encode(messages, templated=True))]
        except ValueError as err:
            raise RequestError(str(err), param="messages") from None

    def _tool_prompt(self, template: str, messages, tools) -> Prompt:
        """A conversation with tools or tool turns, rendered whole by the model's template (fine-tuning here never
        saw tools, so there is no trained framing to follow) and tokenized in one piece."""
        special = {"bos_token": self.tokenizer.bos_token, "eos_token": self.tokenizer.eos_token}
        try:
            text = render_jinja_tool_chat(template, messages, tools, special)
        except ValueError as err:
            raise RequestError(str(err), param="messages") from None
        return Prompt(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def _logprobs(self, body: dict) -> int | None:
        wanted = body.get("logprobs", False)
        if not isinstance(wanted, bool):
            raise RequestError("logprobs must be true or false", param="logprobs")
        top = number_field(body, "top_logprobs", int, None)
        if top is not None and not wanted:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        return (top or 0) if wanted else None

    def _grammar(self, body: dict) -> str | None:
        return response_format_grammar(body)

    def _extra_stop(self) -> tuple[str, ...]:
        # The template's own round markers end a reply (ChatGLM starts a new "[Round N]" otherwise).
        return self.family.chat_template.stop_strings

    def _content(self, text: str | None, streamed: bool) -> dict:
        if not streamed:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {} if text is None else {"content": text}}

    def _choice_logprobs(self, entries, context, prompt_entries, text_offset: int) -> dict:
        def described(piece: str, logprob: float) -> dict:
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**described(piece, entry.logprob), "top_logprobs": [described(*alt) for alt in top]}
                            for entry, piece, top in self._pieces(context, entries)],
                "refusal": None}

    def response(self, request_id: str, prepared: PreparedRequest, choices) -> dict:
        body = super().response(request_id, prepared, choices)
        tools: ToolRequest | None = prepared.tools
        if tools is None or not tools.parses_calls:
            return body
        for payload, choice in zip(body["choices"], choices):
            content, calls = parse_tool_calls(choice.text, tools) if choice.finish_reason == "stop" else (None, [])
            if calls:
                payload["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                payload["finish_reason"] = "tool_calls"
        return body

    def chunks(self, request_id: str, prepared: PreparedRequest, choice, event, first: bool,
               text_offset: int) -> list[dict]:
        """With tools, text that may be the start of a call is held back; at the end a reply that is a call is
        sent as OpenAI streams one: per call a delta with its id and name, then one with its arguments, then
        ``finish_reason: "tool_calls"``."""
        tools: ToolRequest | None = prepared.tools
        if tools is None or not tools.parses_calls:
            return super().chunks(request_id, prepared, choice, event, first, text_offset)
        text, held_from = choice.text, tools.syntax.held_from(choice.text)
        if event is not None:
            sent = tools.syntax.held_from(text[:len(text) - len(event.text)])
            return [self._delta(request_id, prepared, choice, {"content": text[sent:held_from]})] if held_from > sent else []
        out = []
        _, calls = parse_tool_calls(text, tools) if choice.finish_reason == "stop" else (None, [])  # content: sent
        if calls:
            for number, call in enumerate(calls):
                function = call["function"]
                out.append(self._delta(request_id, prepared, choice, {"tool_calls": [
                    {"index": number, "id": call["id"], "type": "function",
                     "function": {"name": function["name"], "arguments": ""}}]}))
                out.append(self._delta(request_id, prepared, choice, {"tool_calls": [
                    {"index": number, "function": {"arguments": function["arguments"]}}]}))
            return out + [self._delta(request_id, prepared, choice, {}, "tool_calls")]
        if held_from < len(text):  # held back, but no call after all
            out.append(self._delta(request_id, prepared, choice, {"content": text[held_from:]}))
        return out + super().chunks(request_id, prepared, choice, event, first, text_offset)

    def _delta(self, request_id: str, prepared: PreparedRequest, choice, delta: dict,
               finish_reason: str | None = None) -> dict:
        return self._envelope(self.chunk_object, request_id, prepared, [
            {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening_chunk(self, request_id: str, prepared: PreparedRequest, choice) -> dict:
        # OpenAI's stream names the speaker once, in a first chunk with no text yet.
        return self._envelope(self.chunk_object, request_id, prepared, [
            {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}])


def _has_tool_turns(messages) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def _plain_messages(messages) -> list:
    """Messages as the chat template takes them: ``developer`` becomes ``system`` (OpenAI's own mapping for models
    without a developer role) and a list of text parts becomes their text joined. Anything else is left for
    ``render_chat`` to refuse, naming it.

    Raises:
        RequestError: a content part that is not text (an image, audio, a file), naming its type.
    """
    if not isinstance(messages, list):
        return messages
    plain = []
    for index, message in enumerate(messages):
        if isinstance(message, dict):
            message = dict(message)
            if message.get("role") == "developer":
                message["role"] = "system"
            if isinstance(message.get("content"), list):
                message["content"] = _joined_text_parts(message["content"], f"messages[{index}].content")
        plain.append(message)
    return plain


def _joined_text_parts(parts: list, where: str) -> str:
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{number}] has type {kind!r}; only text parts ({{'type': 'text', 'text': ...}}) "
                               "are supported by this text-only model", param="messages")
        texts.append(part["text"])
    return "".join(texts)
