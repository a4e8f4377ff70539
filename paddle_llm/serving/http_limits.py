"""How long a REST connection may take to send its request headers, which uvicorn does not bound itself.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` and caps connections with
``limit_concurrency``, but a new connection that sends its headers a byte at a time is held for ever (1,000 such
connections were, in a measurement). ``header_timeout_protocol`` is uvicorn's h11 protocol with one timer more: a
connection whose first request has not fully arrived within the timeout is closed.

It subclasses ``uvicorn.protocols.http.h11_impl.H11Protocol`` and reads its ``cycle`` (None until a request's headers
are in), ``loop`` and ``transport`` attributes: verified with uvicorn 0.55.0 and h11 0.16.0;
``tests/integration/test_serving_fields.py::test_slow_headers_are_cut_off`` fails if they change meaning.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout_seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose first request headers take over ``header_timeout_seconds``."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.loop.call_later(header_timeout_seconds, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
