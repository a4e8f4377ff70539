"""Serving metrics in the Prometheus text format (version 0.0.4), without a client library.

Counters and histograms are updated from request handlers (any thread); gauges are read at scrape time from
callables, so the engine's queue sizes are never stale.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "paddle_llm_"
# The status a request is counted with when its client went away first (nginx's "client closed request"), REST
# and gRPC alike.
CLIENT_GONE = 499


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(list(self.buckets) + ["+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class ServingMetrics:
    """Requests, tokens and latency of one server process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._latency = _Histogram(LATENCY_BUCKETS)
        self._first_token = _Histogram(LATENCY_BUCKETS)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (e.g. requests waiting in the engine)."""
        self._gauges[name] = (help_text, read)

    def record_request(self, protocol: str, endpoint: str, status: int) -> None:
        with self._lock:
            key = (protocol, endpoint, status)
            self._requests[key] = self._requests.get(key, 0) + 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int, seconds: float,
                          first_token_seconds: float | None) -> None:
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            self._latency.observe(seconds)
            if first_token_seconds is not None:
                self._first_token.observe(first_token_seconds)

    def render(self) -> str:
        """The scrape body."""
        with self._lock:
            lines = [f"# HELP {PREFIX}requests_total Requests by protocol, endpoint and status code.",
                     f"# TYPE {PREFIX}requests_total counter"]
            for (protocol, endpoint, status), count in sorted(self._requests.items()):
                lines.append(f'{PREFIX}requests_total{{protocol="{protocol}",endpoint="{endpoint}",status="{status}"}} {count}')
            for name, value, help_text in (
                ("prompt_tokens_total", self._prompt_tokens, "Prompt tokens of completed generations."),
                ("generation_tokens_total", self._completion_tokens, "Tokens generated."),
            ):
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter",
                          f"{PREFIX}{name} {value}"]
            for name, histogram, help_text in (
                ("request_latency_seconds", self._latency, "Time from request to last token."),
                ("time_to_first_token_seconds", self._first_token, "Time from request to first token."),
            ):
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} histogram"]
                lines += histogram.lines(PREFIX + name)
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {read()}"]
        return "\n".join(lines) + "\n"
