"""``POST /v1/chat/completions``: the request and response shapes are ``chat.protocol``'s, the answering
(plain JSON or SSE) is ``openai.streaming``'s."""

from __future__ import annotations

from fastapi import APIRouter, Request

from paddle_llm.serving.openai.chat.protocol import ChatProtocol
from paddle_llm.serving.openai.streaming import generate

router = APIRouter()


@router.post(ChatProtocol.path)
async def chat_completions(request: Request):
    return await generate(request, ChatProtocol)
