"""``POST /v1/completions``: the request and response shapes are ``completions.protocol``'s, the answering
(plain JSON or SSE) is ``openai.streaming``'s."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.completions.protocol import CompletionsProtocol
from paddle_llm.serving.openai.streaming import generate

router = APIRouter()


@router.post(CompletionsProtocol.path)
async def completions(request: Request):
    return await generate(request, CompletionsProtocol)
