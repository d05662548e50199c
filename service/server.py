"""Run the app under uvicorn. SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded), then the
lifespan drains every model's queue and the process exits 0."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from service.config import Settings

log = logging.getLogger("symguard.server")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Server(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # Everything alive now (modules, the app, the sessions) lives as long as the process: move it out of the
        # collector's sight, so a full collection under load walks only what requests allocated, not ~70k
        # start-up objects (a ~20-40 ms pause here, the kind that shows up in p99).
        gc.collect()
        gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, minus re-raising the signal afterwards: a finished graceful shutdown exits 0, not -15."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(settings: Settings, factory: str = "service.api:create_app") -> int:
    """Run the app that `factory` ("module:function", called with the settings) builds; `symguard guard` passes
    service.guard_app:create_guard_app. Imported here, not by the caller: with --processes N the parent process
    only supervises, and leaving the app's imports (ONNX Runtime, numpy, Pillow) to the workers saves ~50 MB."""
    configure_logging(settings.log_level)
    if settings.require_cuda:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log.error("require_cuda is set but this onnxruntime build has no CUDA (available: %s)",
                      ort.get_available_providers())  # fmt: skip
            return 2

    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our logging format
        access_log=False,  # requests are counted in /metrics; an access log per image batch is noise
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
        server_header=False,
    )
    if settings.processes > 1:
        from service.workers import serve_processes

        return serve_processes(settings, options, factory)
    module, _, name = factory.partition(":")
    app_factory: Callable[[Settings], Any] = getattr(importlib.import_module(module), name)
    server = _Server(uvicorn.Config(app_factory(settings), **options))
    server.run()
    # uvicorn leaves started=False when the lifespan startup failed (e.g. require_cuda refused a model)
    return 0 if server.started else 3
