"""``POST /tokenize`` and ``POST /detokenize``: the shapes are ``tokenize.protocol``'s."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.tokenize.protocol import DETOKENIZE_PATH, TOKENIZE_PATH, detokenize, tokenize
from paddle_llm.serving.rest_common import check_api_key, read_json_body, serving_state

router = APIRouter()


@router.post(TOKENIZE_PATH)
async def tokenize_route(request: Request):
    check_api_key(request)
    backend = serving_state(request).backend
    body = await read_json_body(request)
    return await asyncio.to_thread(tokenize, backend.endpoint("completion"), backend.endpoint("chat"),
                                   backend.on_base_model(body))


@router.post(DETOKENIZE_PATH)
async def detokenize_route(request: Request):
    check_api_key(request)
    backend = serving_state(request).backend
    body = await read_json_body(request)
    return await asyncio.to_thread(detokenize, backend.endpoint("completion"), backend.on_base_model(body))
