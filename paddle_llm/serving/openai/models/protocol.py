"""``/v1/models``: the served model and its LoRA adapters, in OpenAI's list and model shapes (an adapter's card names
the base as ``parent`` and its directory as ``root``, as vLLM's do)."""

from __future__ import annotations


def model_card(model_name: str, parent: str | None = None, root: str | None = None) -> dict:
    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "paddle_llm", "parent": parent}
    if root is not None:
        card["root"] = root
    return card


def model_list(model_name: str, adapters=()) -> dict:
    """Args: adapters: ``serving.adapters.ServedAdapter`` records served on ``model_name``."""
    return {"object": "list",
            "data": [model_card(model_name)] + [model_card(a.name, model_name, a.path) for a in adapters]}
