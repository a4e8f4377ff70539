"""``/v1/models``: the one served model, in OpenAI's list shape."""

from __future__ import annotations


def model_list(model_name: str) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "paddle_llm"}]}
