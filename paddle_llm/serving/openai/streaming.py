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

from paddle_llm.serving.engine import RequestHandle, StreamEvent
from paddle_llm.serving.metrics import CLIENT_GONE, ServingMetrics
from paddle_llm.serving.openai.protocol import (
    ChoiceOutput,
    EndpointProtocol,
    PreparedRequest,
    RequestError,
    check_finished,
)
from paddle_llm.serving.rest_common import check_api_key, error_response, read_json_body, serving_state

# Proxies must pass each event on at once rather than buffer the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def generate(request: Request, endpoint: type[EndpointProtocol]) -> Response:
    """Check the key, validate the body, submit its choices, and answer as the request asked (plain JSON or SSE)."""
    state = serving_state(request)
    try:
        check_api_key(request)
        protocol = state.backend.endpoint(endpoint.kind)
        # Tokenizing a long prompt takes a while: off the event loop, so other requests and /health go on meanwhile.
        prepared = await asyncio.to_thread(state.backend.prepare, endpoint.kind, await read_json_body(request))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

        def listener_for(index: int):
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        handles = state.backend.submit(prepared, listener_for)
    except RequestError as err:
        state.metrics.record_request("http", endpoint.path, err.status)
        return error_response(err)
    generation = _Generation(protocol, prepared, handles, events, state.metrics)
    if not prepared.stream:
        return await generation.whole(request)
    return StreamingResponse(generation.event_stream(), media_type="text/event-stream", headers=SSE_HEADERS)


class _Generation:
    """One submitted request (one engine request per choice), from its engine events to the response."""

    def __init__(self, protocol: EndpointProtocol, prepared: PreparedRequest, handles: list[RequestHandle],
                 events: asyncio.Queue, metrics: ServingMetrics):
        self.protocol = protocol
        self.prepared = prepared
        self.handles = handles
        self.events = events
        self.metrics = metrics
        self.request_id = protocol.new_id()
        self.choices = [ChoiceOutput(index, prompt) for index, (prompt, _) in enumerate(prepared.choices())]
        self.unfinished = len(self.choices)

    def _take(self, index: int, event: StreamEvent) -> ChoiceOutput:
        """Add an event to its choice."""
        choice = self.choices[index]
        if not choice.token_ids and not choice.text:
            choice.prompt_logprobs = self.handles[index].prompt_logprobs  # set by the engine before the first event
        choice.text += event.text
        choice.token_ids.extend(event.token_ids)
        choice.logprobs.extend(event.logprobs)
        choice.completion_tokens = event.completion_tokens
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            self.unfinished -= 1
        return choice

    def _cancel_all(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def _record_status(self, status: int) -> None:
        self.metrics.record_request("http", self.protocol.path, status)

    def _record_success(self) -> None:
        self._record_status(200)
        created = min(handle.created for handle in self.handles)
        firsts = [handle.first_token_time for handle in self.handles if handle.first_token_time is not None]
        prompt_tokens = sum(len(prompt.ids) for prompt in self.prepared.prompts)
        self.metrics.record_generation(prompt_tokens, sum(c.completion_tokens for c in self.choices),
                                       time.perf_counter() - created, min(firsts) - created if firsts else None)

    async def whole(self, request: Request) -> Response:
        """The non-streamed answer. Nothing is written until the end, so a watcher reads the connection meanwhile:
        a client that hangs up cancels the request at the engine's next step."""
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            while self.unfinished:
                index, event = await self.events.get()
                if event is None:  # the watcher saw the client go
                    self._cancel_all()
                    self._record_status(CLIENT_GONE)
                    return Response(status_code=CLIENT_GONE)
                try:
                    check_finished(event)
                except RequestError as err:
                    self._cancel_all()
                    self._record_status(err.status)
                    return error_response(err)
                self._take(index, event)
        except asyncio.CancelledError:
            self._cancel_all()
            raise
        finally:
            watcher.cancel()
        self._record_success()
        return JSONResponse(self.protocol.response(self.request_id, self.prepared, self.choices))

    async def _watch_disconnect(self, request: Request) -> None:
        # Waiting on receive() keeps the server reading the socket, so a closed connection is seen at once (polling
        # ``is_disconnected`` did not resume reading, and a dropped request decoded on to max_tokens).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._cancel_all()
        self.events.put_nowait((None, None))

    async def event_stream(self):
        """The SSE body; closing it early (the client went away) cancels the request."""
        protocol, request_id, prepared = self.protocol, self.request_id, self.prepared
        started = [False] * len(self.choices)
        try:
            for choice in self.choices:
                opening = protocol.opening_chunk(request_id, prepared, choice)
                if opening is not None:
                    yield sse(opening)
            while self.unfinished:
                index, event = await self.events.get()
                try:
                    check_finished(event)
                except RequestError as err:  # headers are sent: the error can only be an event
                    self._cancel_all()
                    self.unfinished = 0
                    self._record_status(err.status)
                    yield sse(err.body())
                    break
                text_offset = len(self.choices[index].text)
                choice = self._take(index, event)
                if event.text or event.logprobs or (prepared.echo and not started[index]):
                    if prepared.echo and started[index]:
                        text_offset += len(protocol.prompt_text(choice.prompt))
                    first = not started[index]
                    for payload in protocol.chunks(request_id, prepared, choice, event, first, text_offset):
                        yield sse(payload)
                    started[index] = True
                if choice.finish_reason is not None:
                    for payload in protocol.chunks(request_id, prepared, choice, None, False, 0):
                        yield sse(payload)
                    if not self.unfinished:
                        if prepared.include_usage:
                            yield sse(protocol.usage_chunk(request_id, prepared, self.choices))
                        self._record_success()
            yield sse("[DONE]")
        finally:
            if self.unfinished:  # the client went away mid-stream: free the batch slots now
                self._cancel_all()
                self._record_status(CLIENT_GONE)
