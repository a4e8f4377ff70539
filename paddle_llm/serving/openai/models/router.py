"""``GET /v1/models`` and ``GET /v1/models/{id}``: what clients pass as ``model`` (the official client lists it
before its first call): the base model and each LoRA adapter served on it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.models.protocol import model_list
from paddle_llm.serving.openai.protocol import RequestError
from paddle_llm.serving.rest_common import check_api_key, serving_state

router = APIRouter()


def _served(request: Request) -> dict:
    backend = serving_state(request).backend
    adapters = backend.served.adapters
    return model_list(backend.model_name, adapters.listed() if adapters is not None else ())


@router.get("/v1/models")
async def models(request: Request):
    check_api_key(request)
    return _served(request)


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    check_api_key(request)
    cards = {card["id"]: card for card in _served(request)["data"]}
    if model_id not in cards:
        raise RequestError(f"model {model_id!r} is not served here; this server serves "
                           f"{', '.join(repr(name) for name in cards)}", param="model", status=404,
                           code="model_not_found")
    return cards[model_id]
