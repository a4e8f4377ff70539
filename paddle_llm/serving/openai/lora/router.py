"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: the shapes are ``lora.protocol``'s."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from paddle_llm.serving.openai.lora.protocol import LOAD_PATH, UNLOAD_PATH, load_adapter, unload_adapter
from paddle_llm.serving.rest_common import check_api_key, read_json_body, serving_state

router = APIRouter()


@router.post(LOAD_PATH)
async def load_route(request: Request):
    check_api_key(request)
    body = await read_json_body(request)
    # Reading an adapter's weights and writing its slot waits for the running step: off the event loop.
    return PlainTextResponse(await asyncio.to_thread(load_adapter, serving_state(request).backend.served, body))


@router.post(UNLOAD_PATH)
async def unload_route(request: Request):
    check_api_key(request)
    body = await read_json_body(request)
    return PlainTextResponse(unload_adapter(serving_state(request).backend.served, body))
