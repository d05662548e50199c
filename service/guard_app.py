"""`symguard guard`: the symguard server (same registry, batching, scoring routes and metrics as `symguard serve`)
with a catch-all reverse proxy to the classifier it protects.

Routes, first match wins:
    /healthz  /readyz  /metrics          the guard's own (liveness, model readiness, Prometheus)
    {api_prefix}/v1/...  /v2/...  /docs  symguard's scoring API, moved under a prefix (default /symguard)
    everything else                      proxied to --upstream, through the mode's policy (guard_policy.py)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from service.api import create_app
from service.guard_config import GuardSettings
from service.guard_policy import Guard
from service.guard_proxy import Upstream
from service.metrics import GuardMetrics

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_guard_app(settings: GuardSettings) -> FastAPI:
    @asynccontextmanager
    async def pooled_upstream(app: FastAPI) -> AsyncIterator[None]:
        # one pooled client for the process's life: connections to the upstream are reused across requests
        upstream = Upstream(settings.upstream, settings.upstream_timeout_s, settings.upstream_max_connections, metrics)
        app.state.guard = Guard(settings, metrics, upstream)
        try:
            yield
        finally:
            await upstream.aclose()

    app = create_app(settings, api_prefix=settings.api_prefix, extra_lifespan=pooled_upstream)
    metrics = GuardMetrics(app.state.metrics, settings.mode)
    app.add_route("/{path:path}", _proxy, methods=METHODS, include_in_schema=False)  # last: after every own route
    return app


async def _proxy(request: Request) -> Response:
    guard: Guard = request.app.state.guard
    return await guard.handle(request)
