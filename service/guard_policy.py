"""What the guard does with one request, by mode: find the image, score it, then forward, annotate, block or
replace it. Every request is counted exactly once in symguard_guard_requests_total{mode,outcome}.

    no image where --image-location says    forward untouched                              no_image
    image cannot be read (4xx)              gate/canonicalize: that 4xx; else forward     bad_image
    scoring failed or timed out             fail_closed (not monitor): 503; else forward  fail_closed / fail_open
    OOD in gate mode                        422 ood_input                                  blocked
    otherwise                               forward (annotated / canonicalized by mode)    forwarded
    the upstream is down or too slow        502 / 504                                      upstream_error
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from service.errors import (
    BadRequest, BodyTimeout, InferenceTimeout, OodInput, PayloadTooLarge, ScoringUnavailable, SymguardError,
    UnsupportedMediaType, UpstreamTimeout, UpstreamUnavailable,
)  # fmt: skip
from service.guard_config import GuardSettings
from service.guard_image import Located, locate, may_hold_image
from service.guard_proxy import Upstream
from service.inputs import Encoded
from service.metrics import GuardMetrics
from service.scoring import ImageScore
from service.serving import score_one, served_model, upright_png

log = logging.getLogger("symguard.guard")

HEADER_PREFIX = "x-symguard-"
# The client's own fault, about the image: decoding, media type, pixel count, base64, a malformed body.
IMAGE_ERRORS = (BadRequest, UnsupportedMediaType, PayloadTooLarge)


def score_headers(row: ImageScore) -> dict[str, str]:
    return {
        "X-Symguard-Score": f"{row.score:g}",
        "X-Symguard-Verdict": row.verdict,
        "X-Symguard-Reason": row.reason or "none",
        "X-Symguard-Angle": f"{row.angle_deg:g}",
        "X-Symguard-Reflected": str(row.reflected).lower(),
        "X-Symguard-Model": f"{row.model}:{row.version}",
    }


def unscored_headers(why: str) -> dict[str, str]:
    """annotate/canonicalize stamp every request that carried an image, so the upstream knows it went unchecked."""
    return {"X-Symguard-Verdict": "unscored", "X-Symguard-Reason": why}


@dataclass
class Decision:
    """Forward, with: body (None: stream the client's body unread), a new Content-Type, headers to add."""

    outcome: str
    body: bytes | None = None
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # added to the forwarded request and to the response


class _Refused(Exception):
    """The guard answers itself: `error` (a typed SymguardError) goes to the client, counted as `outcome`."""

    def __init__(self, outcome: str, error: SymguardError) -> None:
        self.outcome, self.error = outcome, error


class Guard:
    def __init__(self, settings: GuardSettings, metrics: GuardMetrics, upstream: Upstream) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.loc = settings.location
        self.metrics = metrics
        self.upstream = upstream
        self.stamps = self.mode in ("annotate", "canonicalize")  # modes that set X-Symguard-* on the request

    async def handle(self, request: Request) -> Response:
        try:
            decision = await self._decide(request)
        except _Refused as r:
            self.metrics.outcome(r.outcome)
            if r.outcome == "fail_closed":  # the guard's own trouble, not the client's: worth a line per request
                log.warning("request answered %d %s: %s %s: %s", r.error.status, r.error.code, request.method,
                            request.url.path, r.error.message)  # fmt: skip
            raise r.error from None  # api.py's one handler turns it into its status and JSON body
        outcome = decision.outcome
        try:
            return await self.upstream.forward(
                request,
                decision.body,
                content_type=decision.content_type,
                add_request_headers=decision.headers,
                add_response_headers=decision.headers,
                drop_prefix=HEADER_PREFIX if self.stamps else None,  # a client must not forge the verdict
            )
        except (UpstreamUnavailable, UpstreamTimeout) as e:
            outcome = "upstream_error"
            log.warning("request answered %d %s: %s %s: %s", e.status, e.code, request.method, request.url.path,
                        e.message)  # fmt: skip
            raise
        finally:
            self.metrics.outcome(outcome)

    async def _decide(self, request: Request) -> Decision:
        content_type = request.headers.get("content-type")
        if not may_hold_image(content_type, self.loc):
            return Decision("no_image")  # streamed through, never read
        try:
            body = await request.body()  # bounded by max_body_bytes (BodyLimit)
        except (PayloadTooLarge, BodyTimeout) as e:  # too big, or dripped too slowly: the client's fault
            raise _Refused("bad_image", e) from None
        try:
            located = await locate(body, content_type, self.loc)
        except IMAGE_ERRORS as e:
            return self._bad_image(body, e)
        if located is None:
            return Decision("no_image", body)
        try:
            async with asyncio.timeout(self.settings.score_timeout_s):
                row, png = await self._score(request, located)
        except IMAGE_ERRORS as e:
            return self._bad_image(body, e)
        except (TimeoutError, InferenceTimeout):
            return self._scoring_failed(body, "timeout", f"no score within {self.settings.score_timeout_s:g}s")
        except Exception as e:  # queue full, model not ready, inference failed, or a bug: never a 500 from here
            if not isinstance(e, SymguardError):
                log.exception("scoring failed unexpectedly")
            return self._scoring_failed(body, "error", getattr(e, "message", None) or f"{type(e).__name__}: {e}")
        return self._act(body, located, row, png)

    async def _score(self, request: Request, located: Located) -> tuple[ImageScore, bytes | None]:
        served = served_model(request, None)  # the server's default model: --model pins it
        scored = await score_one(request, served, None, Encoded(located.data, located.label))
        png = await run_in_threadpool(upright_png, scored) if self.mode == "canonicalize" else None
        return scored.row, png

    def _act(self, body: bytes, located: Located, row: ImageScore, png: bytes | None) -> Decision:
        headers = score_headers(row)
        if self.mode == "monitor":
            return Decision("forwarded", body)
        if self.mode == "annotate":
            return Decision("forwarded", body, headers=headers)
        if self.mode == "gate":
            if row.verdict == "ood":
                raise _Refused("blocked", OodInput(
                    f"the image is outside the poses {row.model}:{row.version} learned for inputs like it "
                    f"(reason: {row.reason}); it was not forwarded",
                    headers=headers, verdict=row.verdict, reason=row.reason, score=row.score, p_value=row.p_value,
                    angle_deg=row.angle_deg, reflected=row.reflected, model=f"{row.model}:{row.version}",
                ))  # fmt: skip
            return Decision("forwarded", body)
        assert png is not None  # canonicalize
        new_body, content_type = located.replaced(png)
        return Decision("forwarded", new_body, content_type, headers)

    def _bad_image(self, body: bytes, e: SymguardError) -> Decision:
        if self.mode in ("gate", "canonicalize"):  # they must act on the image, and cannot
            raise _Refused("bad_image", e)
        return Decision("bad_image", body, headers=unscored_headers("bad_image") if self.stamps else {})

    def _scoring_failed(self, body: bytes, reason: str, why: str) -> Decision:
        if self.mode != "monitor" and self.settings.on_failure == "fail_closed":
            raise _Refused("fail_closed", ScoringUnavailable(f"the image could not be scored: {why}", reason=reason))
        log.info("request forwarded unscored (%s): %s", reason, why)
        self.metrics.failed_open(reason)
        return Decision("fail_open", body, headers=unscored_headers(reason) if self.stamps else {})
