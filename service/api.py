"""The HTTP application: assembles settings, metrics, the model registry, middleware, routes and the one place
where typed errors become HTTP responses. Routes live in routes_v1.py (/v1, health, metrics) and kserve.py (/v2).

`symguard guard` builds on the same app: it moves /v1, /v2 and the docs under `api_prefix` (health and metrics
stay at the root), adds its own lifespan work through `extra_lifespan`, and appends its catch-all proxy route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service import __version__
from service.config import Settings
from service.errors import SymguardError, error_response
from service.kserve import router as v2_router
from service.metrics import Metrics
from service.middleware import Admission, BodyLimit, InFlight, RequestMetrics
from service.registry import Registry
from service.reload_journal import ReloadJournal
from service.routes_v1 import health_router
from service.routes_v1 import router as v1_router
from service.serving import json_response
from service.workers import worker_dir


def create_app(
    settings: Settings | None = None,
    *,
    api_prefix: str = "",
    extra_lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """The server app. `api_prefix` ("" or "/something") moves the /v1 and /v2 routes and the docs under it;
    `extra_lifespan` runs inside the registry's lifespan (started after the models, stopped before them)."""
    settings = settings or Settings()
    metrics = Metrics()
    in_flight = InFlight()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shared = worker_dir()  # set when this is one of several server processes
        journal = ReloadJournal(shared / "reload") if shared else None
        registry = Registry(settings, metrics, in_flight, journal)
        app.state.registry = registry
        await registry.start()
        try:
            if extra_lifespan is None:
                yield
            else:
                async with extra_lifespan(app):
                    yield
        finally:
            await registry.close()  # queued requests finish before the workers stop

    app = FastAPI(
        title="symguard",
        version=__version__,
        description="Per-image rotation/reflection out-of-distribution detection, served from ONNX Runtime.",
        lifespan=lifespan,
        docs_url=f"{api_prefix}/docs",
        redoc_url=f"{api_prefix}/redoc",
        openapi_url=f"{api_prefix}/openapi.json",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    # Admission sits outside BodyLimit: a request it refuses is answered before anything reads its body.
    app.add_middleware(Admission, limit=settings.max_in_flight, metrics=metrics, in_flight=in_flight)
    # RequestMetrics is added last, so it is outermost and also counts the early 503s and 413s.
    routes = [*health_router.routes, *v1_router.routes, *v2_router.routes]  # labels are the unprefixed templates
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    _install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(v1_router, prefix=api_prefix)
    app.include_router(v2_router, prefix=api_prefix)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SymguardError)
    async def typed(_: Request, exc: SymguardError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> Response:
        return json_response(
            {"error": str(exc.detail), "code": f"http_{exc.status_code}"}, exc.status_code, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs[:5])
        return json_response({"error": msg, "code": "invalid_request"}, 422)
