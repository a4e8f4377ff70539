"""``/v1/chat/completions``: messages rendered with the model's chat template, ``chat.completion`` objects out."""

from __future__ import annotations

from paddle_llm.models.chat_template import render_chat
from paddle_llm.serving.openai.protocol import EndpointProtocol, RequestError


class ChatProtocol(EndpointProtocol):
    own_fields = {"messages": "system, user and assistant turns, rendered with the model's chat template",
                  "max_completion_tokens": "the same as max_tokens"}
    kind = "chat"
    path = "/v1/chat/completions"
    prompt_param = "messages"
    id_prefix = "chatcmpl-"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _prompt_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if messages is None:
            raise RequestError("messages is required", param="messages")
        try:
            render_chat(self.family.chat_template, messages, add_generation_prompt=True)  # validates, naming the bad field
            return self.encode(list(messages), templated=True)
        except ValueError as err:
            raise RequestError(str(err), param="messages") from None

    def _extra_stop(self) -> tuple[str, ...]:
        # The template's own round markers end a reply (ChatGLM starts a new "[Round N]" otherwise).
        return self.family.chat_template.stop_strings

    def _content(self, text: str | None, streamed: bool) -> dict:
        if not streamed:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {} if text is None else {"content": text}}

    def opening_chunk(self, request_id: str) -> dict:
        # OpenAI's stream names the speaker once, in a first chunk with no text yet.
        return self._envelope(self.chunk_object, request_id,
                              [self._choice({"delta": {"role": "assistant", "content": ""}}, None)])
