"""Pure ASGI middleware: admission (a bound on requests in progress), a request body limit enforced while reading,
and per-route request metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTimeout, Overloaded, PayloadTooLarge, error_response
from service.metrics import Metrics

log = logging.getLogger("symguard.admission")
SHED_LOG_EVERY_S = 10.0  # one line per interval under overload, not one per refused request

UNLIMITED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # health, metrics, docs, model lists: cheap, and must
# keep answering under overload (a scrape that times out hides the overload it should show)


class InFlight:
    """How many non-GET requests are in progress. Admission bounds it; the batcher reads it to tell whether another
    request is on its way (being read or decoded) and worth waiting for."""

    def __init__(self) -> None:
        self.count = 0


class Admission:
    """503 + Retry-After, before the body is read, once `limit` requests are already in progress.

    The batcher's queue bounds only requests that reached inference. Under overload the requests still being read,
    decoded and preprocessed pile up in front of it without bound: each one holds a connection and memory, and
    its decode work takes CPU from inference. Refusing them at the door costs a few microseconds each, so the
    server keeps its throughput, its memory and a bounded latency for what it accepts.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, in_flight: InFlight) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.in_flight = in_flight
        self._shed_since_log = 0
        self._last_log = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in UNLIMITED_METHODS:
            return await self.app(scope, receive, send)
        flight = self.in_flight
        if flight.count >= self.limit:
            self.metrics.shed.inc()
            self._log_shed()
            err = Overloaded(f"{flight.count} requests are in progress (limit {self.limit}); retry shortly")
            return await error_response(err)(scope, receive, send)
        flight.count += 1  # one event loop, no await between the check and this: no lock needed
        self.metrics.in_progress.set(flight.count)
        try:
            await self.app(scope, receive, send)
        finally:
            flight.count -= 1
            self.metrics.in_progress.set(flight.count)

    def _log_shed(self) -> None:
        self._shed_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= SHED_LOG_EVERY_S:
            log.warning("overloaded: %d request(s) refused with 503 since the last line (max_in_flight %d)",
                        self._shed_since_log, self.limit)  # fmt: skip
            self._shed_since_log, self._last_log = 0, now


class BodyLimit:
    """Bounds on the request body: its size and how long it may take to arrive.

    Size: 413 before reading a body that announces itself too large; for chunked bodies, 413 as soon as the count
    passes. Time: with `timeout_s`, the whole body must arrive within that many seconds of the headers, else 408
    (a client dripping a byte at a time would otherwise hold its request, and a worker's memory, forever).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server rejects a malformed Content-Length itself
            if too_big:
                err = PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}")
                return await error_response(err)(scope, receive, send)

        seen = 0
        body_done = False
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s

        async def limited() -> Message:
            # Errors raised here surface inside the handler that reads the body, so api.py's handler answers them.
            nonlocal seen, body_done
            if body_done or deadline is None:
                return await receive()  # after the body, the app may wait on http.disconnect as long as it likes
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {self.timeout_s:g}s ({seen} bytes received)"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # http.disconnect
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """symguard_requests_total{endpoint,code} and latency, labelled by route template (bounded), never the raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # to label requests answered before routing (the early 413s of BodyLimit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)
