"""How both generate endpoints answer: one JSON body, or server-sent events (``"stream": true``).

Everything here is the same for ``/v1/completions`` and ``/v1/chat/completions``; what differs (the request's
fields, the shape of a choice) is the endpoint's ``EndpointProtocol``. The SSE framing is ``data: {chunk}`` lines
ending with ``data: [DONE]``.

Engine events arrive on the engine thread and are handed to the request's event loop with
``call_soon_threadsafe``, so no thread ever blocks per request, whatever the number of concurrent clients. A client
that goes away (a closed stream, or a plain request whose connection dropped) cancels its request and frees its
batch slot; it is counted with status 499.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from paddle_llm.serving.engine import Completion, RequestHandle, StreamEvent
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.serving.openai.protocol import (
    EndpointProtocol,
    PreparedRequest,
    RequestError,
    check_finished,
    parse_json_body,
)
from paddle_llm.serving.rest_common import check_api_key, error_response, serving_state

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
CLIENT_GONE = 499  # nginx's "client closed request": no response reached anyone
# Proxies must pass each event on at once rather than buffer the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def generate(request: Request, endpoint: type[EndpointProtocol]) -> Response:
    """Check the key, validate the body, submit it, and answer as the request asked (plain JSON or SSE)."""
    state = serving_state(request)
    try:
        check_api_key(request)
        protocol = state.backend.endpoint(endpoint.kind)
        prepared = protocol.prepare(parse_json_body(await request.body()))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        handle = state.backend.submit(prepared, listener=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except RequestError as err:
        state.metrics.record_request("http", endpoint.path, err.status)
        return error_response(err)
    generation = _Generation(protocol, prepared, handle, events, state.metrics)
    if not prepared.stream:
        return await generation.whole(request)
    return StreamingResponse(generation.event_stream(), media_type="text/event-stream", headers=SSE_HEADERS)


class _Generation:
    """One submitted request, from its engine events to the response."""

    def __init__(self, protocol: EndpointProtocol, prepared: PreparedRequest, handle: RequestHandle,
                 events: asyncio.Queue, metrics: ServingMetrics):
        self.protocol = protocol
        self.prepared = prepared
        self.handle = handle
        self.events = events
        self.metrics = metrics
        self.request_id = protocol.new_id()

    def _record_status(self, status: int) -> None:
        self.metrics.record_request("http", self.protocol.path, status)

    def _record_success(self, last: StreamEvent) -> None:
        self._record_status(200)
        handle = self.handle
        first = None if handle.first_token_time is None else handle.first_token_time - handle.created
        self.metrics.record_generation(last.prompt_tokens, last.completion_tokens,
                                       time.perf_counter() - handle.created, first)

    async def whole(self, request: Request) -> Response:
        """The non-streamed answer; polls for a client that hung up, since nothing is written until the end."""
        pieces, last = [], None
        try:
            while last is None or last.finish_reason is None:
                try:
                    last = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.handle.cancel()
                        self._record_status(CLIENT_GONE)
                        return Response(status_code=CLIENT_GONE)
                    continue
                pieces.append(last.text)
        except asyncio.CancelledError:
            self.handle.cancel()
            raise
        try:
            check_finished(last)
        except RequestError as err:
            self._record_status(err.status)
            return error_response(err)
        self._record_success(last)
        completion = Completion("".join(pieces), (), last.finish_reason, last.prompt_tokens,
                                last.completion_tokens, None, 0.0)
        return JSONResponse(self.protocol.response(self.request_id, completion))

    async def event_stream(self):
        """The SSE body; closing it early (the client went away) cancels the request."""
        protocol, request_id = self.protocol, self.request_id
        finished = False
        try:
            opening = protocol.opening_chunk(request_id)
            if opening is not None:
                yield sse(opening)
            while not finished:
                event = await self.events.get()
                finished = event.finish_reason is not None
                try:
                    check_finished(event)
                except RequestError as err:  # headers are sent: the error can only be an event
                    self._record_status(err.status)
                    yield sse(err.body())
                    break
                if event.text:
                    yield sse(protocol.chunk(request_id, event.text, None))
                if finished:
                    yield sse(protocol.chunk(request_id, None, event.finish_reason))
                    if self.prepared.include_usage:
                        yield sse(protocol.usage_chunk(request_id, event))
                    self._record_success(event)
            yield sse("[DONE]")
        finally:
            if not finished:  # the client went away mid-stream: free the batch slot now
                self.handle.cancel()
                self._record_status(CLIENT_GONE)
