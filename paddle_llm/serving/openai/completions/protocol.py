"""``/v1/completions``: a raw prompt in, ``text_completion`` objects out (no chat template is applied)."""

from __future__ import annotations

from paddle_llm.serving.openai.protocol import EndpointProtocol, RequestError


class CompletionsProtocol(EndpointProtocol):
    own_fields = {"prompt": "one string"}
    kind = "completion"
    path = "/v1/completions"
    prompt_param = "prompt"
    id_prefix = "cmpl-"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        # The official client sends a one-prompt list as is; a batch of prompts is not served.
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", param="prompt")
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return self.encode([{"role": "user", "content": prompt}], templated=False)

    def _content(self, text: str | None, streamed: bool) -> dict:
        return {"text": text or ""}
