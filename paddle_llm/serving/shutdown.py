"""How ``serve`` drains on SIGTERM, and what a request still running when the drain period ends gets.

uvicorn alone waits ``timeout_graceful_shutdown`` and then cancels what is left: a plain request got a text/plain
500, a stream just stopped, and the process still exited 0. ``DrainingServer`` fails the engine's remaining
requests when the period ends instead, so each one is answered as any failed request is (an OpenAI-shaped error
body, or an error event in a stream, or a gRPC INTERNAL status), with uvicorn's own cut-off
``ANSWER_SECONDS`` later as the backstop; ``drain_cut_short`` then tells ``serve`` to exit with
``EXIT_DRAIN_CUT_SHORT``.

It extends ``uvicorn.Server.shutdown`` and reads ``server_state.tasks`` (the requests still being answered):
verified with uvicorn 0.55.0; ``tests/integration/test_serving_fields.py::test_drain_cut_short_answers_and_exits_3``
fails if that changes.
"""

from __future__ import annotations

import asyncio

import uvicorn

EXIT_DRAIN_CUT_SHORT = 3
ANSWER_SECONDS = 2.0  # for the error answers to be written after the engine fails the requests


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose drain ends by failing the engine's requests (``engine=None``: nothing to fail).

    ``config.timeout_graceful_shutdown`` must be ``grace_seconds + ANSWER_SECONDS`` (``drain_config_seconds``).
    """

    def __init__(self, config: uvicorn.Config, grace_seconds: float, engine=None):
        super().__init__(config)
        self.grace_seconds = grace_seconds
        self.engine = engine
        self.drain_cut_short = False

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace_seconds, self._end_drain)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_drain(self) -> None:
        stats = None if self.engine is None else self.engine.stats()
        engine_busy = stats is not None and stats.running + stats.waiting > 0
        if not self.server_state.tasks and not engine_busy:
            return
        self.drain_cut_short = True
        if self.engine is not None:
            self.engine.abort_all(f"the server shut down: its drain period (--graceful_shutdown_seconds "
                                  f"{self.grace_seconds:g}) ended before this request finished")


def drain_config_seconds(grace_seconds: float) -> float:
    """uvicorn's own ``timeout_graceful_shutdown`` for a drain period of ``grace_seconds``."""
    return grace_seconds + ANSWER_SECONDS
