"""``GET /v1/models``: what clients pass as ``model`` (the official client lists it before its first call)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.models.protocol import model_list
from paddle_llm.serving.rest_common import check_api_key, serving_state

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    check_api_key(request)
    return model_list(serving_state(request).backend.model_name)
