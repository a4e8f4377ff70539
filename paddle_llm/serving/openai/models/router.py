"""``GET /v1/models`` and ``GET /v1/models/{id}``: what clients pass as ``model`` (the official client lists it
before its first call)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.models.protocol import model_card, model_list
from paddle_llm.serving.openai.protocol import RequestError
from paddle_llm.serving.rest_common import check_api_key, serving_state

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    check_api_key(request)
    return model_list(serving_state(request).backend.model_name)


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    check_api_key(request)
    name = serving_state(request).backend.model_name
    if model_id != name:
        raise RequestError(f"model {model_id!r} is not served here; this server serves {name!r}", param="model",
                           status=404, code="model_not_found")
    return model_card(name)
