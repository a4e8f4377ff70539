"""``POST /tokenize`` and ``POST /detokenize``: the shapes are ``tokenize.protocol``'s."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.protocol import parse_json_body
from paddle_llm.serving.openai.tokenize.protocol import DETOKENIZE_PATH, TOKENIZE_PATH, detokenize, tokenize
from paddle_llm.serving.rest_common import check_api_key, serving_state

router = APIRouter()


@router.post(TOKENIZE_PATH)
async def tokenize_route(request: Request):
    check_api_key(request)
    backend = serving_state(request).backend
    return tokenize(backend.endpoint("completion"), backend.endpoint("chat"), parse_json_body(await request.body()))


@router.post(DETOKENIZE_PATH)
async def detokenize_route(request: Request):
    check_api_key(request)
    return detokenize(serving_state(request).backend.endpoint("completion"), parse_json_body(await request.body()))
