"""``/v1/models``: the one served model, in OpenAI's list and model shapes."""

from __future__ import annotations


def model_card(model_name: str) -> dict:
    return {"id": model_name, "object": "model", "created": 0, "owned_by": "paddle_llm"}


def model_list(model_name: str) -> dict:
    return {"object": "list", "data": [model_card(model_name)]}
