"""``/v1/chat/completions``: messages rendered with the model's chat template, ``chat.completion`` objects out."""

from __future__ import annotations

from paddle_llm.models.chat_template import render_chat
from paddle_llm.serving.openai.protocol import EndpointProtocol, PreparedRequest, Prompt, RequestError, number_field
from paddle_llm.serving.sampling import MAX_TOP_LOGPROBS


class ChatProtocol(EndpointProtocol):
    own_fields = {"messages": "system (or developer), user and assistant turns, rendered with the model's chat "
                              "template; content a string or a list of text parts",
                  "max_completion_tokens": "the same as max_tokens",
                  "logprobs": "true: each token's logprob",
                  "top_logprobs": f"0 to {MAX_TOP_LOGPROBS} most likely alternatives per token (needs logprobs)"}
    kind = "chat"
    path = "/v1/chat/completions"
    prompt_param = "messages"
    id_prefix = "chatcmpl-"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def prompts(self, body: dict) -> list[Prompt]:
        messages = body.get("messages")
        if messages is None:
            raise RequestError("messages is required", param="messages")
        messages = _plain_messages(messages)
        if isinstance(messages, list):
            self.check_text_length(sum(len(m.get("content")) for m in messages
                                       if isinstance(m, dict) and isinstance(m.get("content"), str)))
        try:
            render_chat(self.family.chat_template, messages, add_generation_prompt=True)  # validates, naming the bad field
            return [Prompt(self.encode(messages, templated=True))]
        except ValueError as err:
            raise RequestError(str(err), param="messages") from None

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

    def opening_chunk(self, request_id: str, prepared: PreparedRequest, choice) -> dict:
        # OpenAI's stream names the speaker once, in a first chunk with no text yet.
        return self._envelope(self.chunk_object, request_id, prepared, [
            {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}])


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
