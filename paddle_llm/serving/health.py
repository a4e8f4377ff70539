"""``GET /health`` and ``GET /metrics``: what load balancers and Prometheus poll, open even when ``/v1/*`` needs a key.

Shared by the engine app and the FastDeploy proxy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from paddle_llm.serving.rest_common import serving_state

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    return PlainTextResponse(serving_state(request).metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)
