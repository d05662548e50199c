"""Guard test support: the echo upstream as a real process, and a guard served like LiveServer serves symguard."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from _support import LiveServer

from bench.workload import free_port  # noqa: F401  (re-exported for the guard tests)
from service.guard_app import create_guard_app
from service.guard_config import GuardSettings

UPSTREAM_PY = Path(__file__).with_name("_upstream.py")


class EchoUpstream:
    """tests/service/_upstream.py in its own process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EchoUpstream:
        self.proc = subprocess.Popen([sys.executable, str(UPSTREAM_PY), "--port", str(self.port)])
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echo upstream did not start (exit {self.proc.poll()})")
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class GuardServer(LiveServer):
    """create_guard_app(GuardSettings(...)) under uvicorn in a thread, on a socket bound first."""

    def __init__(self, **settings: object) -> None:  # noqa: D107 - same shape as LiveServer, another app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.settings = GuardSettings(  # type: ignore[call-arg]
            host="127.0.0.1", port=port, intra_op_threads=1, inference_workers=2, max_delay_ms=1, **settings
        )
        self.app = create_guard_app(self.settings)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{port}"


class GuardPool:
    """Guards started on demand, one per distinct settings, all stopped at the end (a module fixture holds it)."""

    def __init__(self, **defaults: object) -> None:
        self.defaults = defaults
        self.running: dict[tuple[tuple[str, str], ...], GuardServer] = {}

    def __call__(self, **settings: object) -> GuardServer:
        merged = {**self.defaults, **settings}
        key = tuple(sorted((k, repr(v)) for k, v in merged.items()))
        if key not in self.running:
            self.running[key] = GuardServer(**merged).__enter__()
        return self.running[key]

    def __enter__(self) -> GuardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for g in self.running.values():
            g.__exit__()


def samples(client: httpx.Client, name: str, **labels: str) -> float:
    """Sum of the /metrics samples called `name` whose labels include `labels` (0 when there are none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename, content type, payload) of each part of a multipart/form-data body, via the email parser."""
    from email import message_from_bytes, policy

    msg = message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=policy.HTTP)
    return [
        (p.get_param("name", header="content-disposition"), p.get_filename(), p.get("content-type"),
         p.get_payload(decode=True))
        for p in msg.iter_parts()
    ]  # fmt: skip
