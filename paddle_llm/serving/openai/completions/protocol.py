"""``/v1/completions``: raw prompts in, ``text_completion`` objects out (no chat template is applied)."""

from __future__ import annotations

from paddle_llm.serving.openai.protocol import EndpointProtocol, Prompt, RequestError, number_field

MAX_LOGPROBS = 5  # OpenAI's limit for this endpoint


class CompletionsProtocol(EndpointProtocol):
    own_fields = {
        "prompt": "a string, a list of token ids, or a batch: a list of strings or of token-id lists",
        "echo": "put the prompt in front of the text (and, with logprobs, the prompt tokens' logprobs)",
        "logprobs": f"0 to {MAX_LOGPROBS}: each token's logprob and that many top alternatives",
        "best_of": "only equal to n (no extra candidates are drawn)",
    }
    kind = "completion"
    path = "/v1/completions"
    prompt_param = "prompt"
    id_prefix = "cmpl-"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def prompts(self, body: dict) -> list[Prompt]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt, as text or as token ids
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of either",
                               param="prompt")
        return [self._one_prompt(item, f"prompt[{index}]") for index, item in enumerate(prompt)]

    def _one_prompt(self, item, where: str) -> Prompt:
        if isinstance(item, str):
            if not item:
                raise RequestError(f"{where} must not be empty", param="prompt")
            self.check_text_length(len(item))
            return Prompt(self.encode([{"role": "user", "content": item}], templated=False), item)
        try:
            return Prompt(self.check_token_ids(item, "prompt"))
        except RequestError:
            raise RequestError(f"{where} must be a non-empty string or a list of token ids in "
                               f"[0, {len(self.tokenizer)})", param="prompt") from None

    def _logprobs(self, body: dict) -> int | None:
        top = number_field(body, "logprobs", int, None)
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {top}", param="logprobs")
        best_of = number_field(body, "best_of", int, None)
        if best_of is not None and best_of != number_field(body, "n", int, 1):
            raise RequestError(f"best_of must equal n (drawing extra candidates is not supported), got {best_of}",
                               param="best_of")
        return top

    def _echo(self, body: dict) -> bool:
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError("echo must be true or false", param="echo")
        return echo

    def _content(self, text: str | None, streamed: bool) -> dict:
        return {"text": text or ""}

    def _choice_logprobs(self, entries, context, prompt_entries, text_offset: int) -> dict:
        # OpenAI's legacy shape: parallel lists; a token's top_logprobs also holds the token itself.
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset

        def add(piece: str, logprob: float | None, top: dict | None):
            nonlocal offset
            tokens.append(piece)
            token_logprobs.append(logprob)
            top_logprobs.append(top)
            offsets.append(offset)
            offset += len(piece)

        if prompt_entries is not None:
            first = context[0]
            add(self.decode([first]), None, None)
            for entry, piece, top in self._pieces(context[:1], prompt_entries):
                add(piece, entry.logprob, {**dict(top), piece: entry.logprob})
        for entry, piece, top in self._pieces(context, entries):
            add(piece, entry.logprob, {**dict(top), piece: entry.logprob})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}
