"""`--processes N`: N server processes on one listening socket, each with its own models, event loop and batcher.

On two cores, one process spends a core's worth of Python (HTTP, decoding, scoring) on its event loop while its
inference threads wait for the GIL; a second process doubles the loops (BENCHMARKS.md, "Processes").

The parent binds the port and supervises with uvicorn's Multiprocess: a worker that dies is replaced, SIGTERM
stops them all gracefully, SIGHUP replaces them one by one. The processes share one private folder:
    settings.json   the settings they all start from (flags included, which the environment would not carry)
    metrics/        PROMETHEUS_MULTIPROC_DIR: /metrics sums every process, whichever one a scrape reaches
    reload/         the reload journal (reload_journal.py): a reload reaches every process
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.config import Settings
from service.reload_journal import pid_alive

WORKER_DIR_ENV = "SYMGUARD_WORKER_DIR"  # set by the parent for its workers; not a setting
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("symguard.workers")


def worker_dir() -> Path | None:
    value = os.environ.get(WORKER_DIR_ENV)
    return Path(value) if value else None


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _plain(settings: Settings) -> dict[str, Any]:
    """The settings as JSON values, secrets included (the file is private to this user; see serve_processes)."""
    out: dict[str, Any] = {}
    for key, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def serve_processes(settings: Settings, config_kw: dict[str, Any], factory: str) -> int:
    """Run the app `factory` ("module:function") builds from the settings in settings.processes worker processes
    behind one socket; returns the exit code."""
    shared = Path(tempfile.mkdtemp(prefix="symguard-"))  # mode 0700: the settings file holds the tokens
    try:
        (shared / "metrics").mkdir()
        (shared / "settings.json").write_text(
            json.dumps({"settings": _plain(settings), "class": _qualname(type(settings)), "factory": factory,
                        "parent": os.getpid()})
        )
        os.environ[WORKER_DIR_ENV] = str(shared)  # spawned workers inherit the environment
        os.environ[MULTIPROC_ENV] = str(shared / "metrics")
        # glibc gives each thread that allocates its own malloc arena; with a decode pool and inference threads
        # per process that is RSS nobody uses. Two arenas: 32-image requests at 64 clients peaked at 343 MB for
        # the whole tree instead of 382 MB, at the same images/s (BENCHMARKS.md). A value set by the user wins.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        config = uvicorn.Config(
            "service.workers:worker_app", factory=True, workers=settings.processes, **config_kw
        )
        sock = config.bind_socket()
        supervisor = Multiprocess(config, sockets=[sock])
        log.info("%d server processes on %s:%d (shared state in %s)", settings.processes, settings.host,
                 settings.port, shared)  # fmt: skip
        try:
            supervisor.run()
        finally:
            sock.close()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
        return 3 if failed else 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def worker_app() -> Any:
    """In each worker: the app, built from the parent's settings file (uvicorn calls this as a factory)."""
    from service.server import configure_logging

    shared = worker_dir()
    assert shared is not None, f"{WORKER_DIR_ENV} is set by serve_processes for its workers"
    spec = json.loads((shared / "settings.json").read_text())
    _exit_with_parent(spec["parent"])
    settings = _load(spec["class"]).model_validate(spec["settings"])
    configure_logging(settings.log_level)
    _forget_dead_processes(Path(os.environ[MULTIPROC_ENV]))
    app = _load(spec["factory"])(settings)
    _freeze_after_startup(app)
    return app


def _exit_with_parent(parent: int) -> None:
    """SIGTERM (a graceful stop) for this worker when its supervisor dies, even by SIGKILL or the OOM killer:
    otherwise the worker keeps serving on the port, unsupervised, and nothing stops it (seen here before this)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _forget_dead_processes(metrics_dir: Path) -> None:
    """Drop the live-gauge files of workers that died (a graceful exit drops its own, in the lifespan)."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for p in metrics_dir.glob("gauge_live*_*.db") if (m := re.search(r"_(\d+)\.db$", p.name))}
    for pid in pids:
        if not pid_alive(pid):
            multiprocess.mark_process_dead(pid, str(metrics_dir))


def _freeze_after_startup(app: Any) -> None:
    """As server._Server does for one process: once the models are loaded, move everything alive out of the
    collector's sight (a full collection under load then walks only what requests allocated); on the way out,
    drop this process's live gauges."""
    from prometheus_client import multiprocess

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[None]:
        try:
            async with inner(a):
                gc.collect()
                gc.freeze()
                yield
        finally:
            multiprocess.mark_process_dead(os.getpid(), os.environ[MULTIPROC_ENV])

    app.router.lifespan_context = lifespan
