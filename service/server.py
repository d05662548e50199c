"""Run the app under uvicorn. SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), then the
lifespan drains every model's queue and the process exits 0."""

from __future__ import annotations

import logging

import onnxruntime as ort
import uvicorn

from service.config import Settings

log = logging.getLogger("symguard.server")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    if settings.require_cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        log.error("require_cuda is set but this onnxruntime build has no CUDA (available: %s)", ort.get_available_providers())
        return 2
    from service.api import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our logging format
        access_log=False,  # requests are counted in /metrics; an access log per image batch is noise
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn leaves started=False when the lifespan startup failed (e.g. require_cuda refused a model)
    return 0 if server.started else 3
