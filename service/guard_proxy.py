"""Forward one request to the upstream over a pooled httpx.AsyncClient and stream its answer back.

Method, path (raw, as the client encoded it), query and end-to-end headers are kept; hop-by-hop headers are
dropped both ways (RFC 9110 §7.6.1), Host becomes the upstream's and the client's goes to X-Forwarded-Host.
Bodies are streamed both ways unless the guard already read the request body to score it. Transport failures
become typed errors (502 / 504) before any byte of a response has been sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

from service.errors import BodyTimeout, PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from service.metrics import GuardMetrics

log = logging.getLogger("symguard.guard")

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
# Recomputed here or by uvicorn: a forwarded body may have been replaced; uvicorn writes its own Date.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Headers named in Connection are hop-by-hop too."""
    return {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}


class Upstream:
    def __init__(self, base_url: str, timeout_s: float, max_connections: int, metrics: GuardMetrics) -> None:
        self.base = httpx.URL(base_url)
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,  # a redirect is the upstream's answer to the client, not ours to follow
            trust_env=False,  # HTTP(S)_PROXY of the host must not reroute a sidecar's loopback traffic
        )
        # no default User-Agent / Accept-Encoding: the upstream sees the client's headers, not httpx's
        self.client.headers = httpx.Headers()

    async def aclose(self) -> None:
        await self.client.aclose()

    def url_for(self, request: Request) -> httpx.URL:
        raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
        query: bytes = request.scope.get("query_string", b"")
        base_path = self.base.raw_path.rstrip(b"/")
        return self.base.copy_with(raw_path=base_path + raw_path + (b"?" + query if query else b""))

    def request_headers(
        self, request: Request, drop_prefix: str | None, extra: Mapping[str, str], content_type: str | None
    ) -> list[tuple[str, str]]:
        conn = _connection_tokens(request.headers)
        out = [
            (k, v)
            for k, v in request.headers.items()
            if k not in REQUEST_DROP
            and k not in conn
            and not (drop_prefix and k.startswith(drop_prefix))
            and not (content_type is not None and k == "content-type")
        ]
        if content_type is not None:
            out.append(("content-type", content_type))
        client = request.client.host if request.client else None
        prior = request.headers.get("x-forwarded-for")
        if client:
            out = [(k, v) for k, v in out if k != "x-forwarded-for"]
            out.append(("x-forwarded-for", f"{prior}, {client}" if prior else client))
        if "host" in request.headers and "x-forwarded-host" not in request.headers:
            out.append(("x-forwarded-host", request.headers["host"]))
        if "x-forwarded-proto" not in request.headers:
            out.append(("x-forwarded-proto", request.url.scheme))
        out += list(extra.items())
        return out

    async def forward(
        self,
        request: Request,
        body: bytes | None,
        *,
        content_type: str | None = None,
        add_request_headers: Mapping[str, str] | None = None,
        add_response_headers: Mapping[str, str] | None = None,
        drop_prefix: str | None = None,
    ) -> StreamingResponse:
        """Send upstream and start streaming its response. body=None streams the client's body through unread.

        content_type replaces the client's (a replaced body); drop_prefix removes client headers the guard sets
        itself, so a client cannot forge them."""
        headers = self.request_headers(request, drop_prefix, add_request_headers or {}, content_type)
        if body is None:
            declared = request.headers.get("content-length")
            if declared is not None:  # keep a sized body sized (httpx would chunk a stream otherwise)
                headers.append(("content-length", declared))
            content: bytes | AsyncIterator[bytes] = request.stream()
        else:
            content = body
        url = self.url_for(request)
        upstream_req = self.client.build_request(request.method, url, headers=headers, content=content)
        t0 = time.perf_counter()
        try:
            response = await self.client.send(upstream_req, stream=True)
        except (PayloadTooLarge, BodyTimeout):
            raise  # a body limit tripped while streaming the client's body: the client's fault, 413 / 408
        except httpx.TimeoutException as e:
            self.metrics.upstream_error("timeout")
            raise UpstreamTimeout(f"the upstream did not answer within the limit ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            self.metrics.upstream_error("connect")
            raise UpstreamUnavailable(f"cannot connect to the upstream: {e}") from None
        except httpx.HTTPError as e:
            self.metrics.upstream_error("other")
            raise UpstreamUnavailable(f"the upstream failed: {type(e).__name__}: {e}") from None
        finally:
            self.metrics.upstream_duration.observe(time.perf_counter() - t0)

        out = StreamingResponse(self._relay(response), status_code=response.status_code)
        conn = _connection_tokens(response.headers)
        out.raw_headers = [
            (k, v)
            for k, v in response.headers.raw
            if k.decode("latin-1").lower() not in RESPONSE_DROP and k.decode("latin-1").lower() not in conn
        ]
        out.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (add_response_headers or {}).items()]
        return out

    async def _relay(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The upstream's bytes as they come (still compressed if they were: Content-Encoding is passed through)."""
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:  # headers are already sent: all we can do is cut the response short
            self.metrics.upstream_error("timeout" if isinstance(e, httpx.TimeoutException) else "other")
            log.warning("upstream response broke off mid-body: %s: %s", type(e).__name__, e)
            raise
        finally:
            await response.aclose()
