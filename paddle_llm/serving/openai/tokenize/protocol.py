"""``/tokenize`` and ``/detokenize``, in vLLM's request and response shapes.

A prompt is encoded exactly as the generate endpoint that takes it would encode it (``prompt`` as
``/v1/completions``, ``messages`` as ``/v1/chat/completions`` with the reply prompt), so ``count`` is the
``usage.prompt_tokens`` a request would be billed.
"""

from __future__ import annotations

from paddle_llm.serving.openai.protocol import EndpointProtocol, RequestError, check_fields

TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"
TOKENIZE_FIELDS = {
    "model": "the served model's id or a LoRA adapter's name (404 otherwise)",
    "prompt": "a string, encoded as /v1/completions encodes it",
    "messages": "a conversation, encoded as /v1/chat/completions encodes it",
}
DETOKENIZE_FIELDS = {
    "model": "the served model's id or a LoRA adapter's name (404 otherwise)",
    "tokens": "token ids",
}


def tokenize(completions: EndpointProtocol, chat: EndpointProtocol, body: dict) -> dict:
    """``{"count", "max_model_len", "tokens"}``. Raises: RequestError naming the field."""
    check_fields(body, TOKENIZE_FIELDS, TOKENIZE_PATH)
    completions.check_model(body)
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("set either prompt or messages", param="prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise RequestError("prompt must be a string", param="prompt")
        ids = completions.prompts(body)[0].ids
    else:
        ids = chat.prompts(body)[0].ids
    return {"count": len(ids), "max_model_len": completions.max_context_length, "tokens": ids}


def detokenize(protocol: EndpointProtocol, body: dict) -> dict:
    """``{"prompt"}``: the text of ``tokens``. Raises: RequestError naming the field."""
    check_fields(body, DETOKENIZE_FIELDS, DETOKENIZE_PATH)
    protocol.check_model(body)
    return {"prompt": protocol.decode(protocol.check_token_ids(body.get("tokens"), "tokens"))}
