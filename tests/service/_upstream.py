"""A stand-in upstream for the guard tests, run as its own process: it echoes what it received.

    python tests/service/_upstream.py --port 9001

Every method and path answers 200 JSON: method, path, raw_path, query, headers (in order, repeats kept),
the body's length and sha256, and the body itself in base64 (so a test can look at a forwarded image).
Request headers that steer it:
    x-echo-sleep: SECONDS     answer that much later (an upstream that is too slow)
    x-echo-status: CODE       answer with this status
GET /stream answers in three chunks without a Content-Length. Responses carry two Set-Cookie headers and a
Keep-Alive header (hop-by-hop: a proxy must not pass it on).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i};".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain", headers={"x-upstream": "echo"})


async def echo(request: Request) -> Response:
    body = await request.body()
    await asyncio.sleep(float(request.headers.get("x-echo-sleep", "0")))
    content = {
        "method": request.method,
        "path": request.url.path,
        "raw_path": request.scope["raw_path"].decode("latin-1"),
        "query": request.scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_b64": base64.b64encode(body).decode(),
    }
    response = Response(orjson.dumps(content), int(request.headers.get("x-echo-status", "200")),
                        media_type="application/json")  # fmt: skip
    response.raw_headers += [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-upstream", b"echo"),
                             (b"keep-alive", b"timeout=5")]  # fmt: skip
    return response


app = Starlette(routes=[Route("/stream", stream), Route("/{path:path}", echo, methods=METHODS)])

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
