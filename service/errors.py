"""Every failure the service knows about, as a type with its HTTP status. api.py maps them to responses in one handler.

The JSON body is ``{"error": message, "code": code}``; "error" is also the Open Inference Protocol's error field.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response


class SymguardError(Exception):
    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def body(self) -> dict[str, object]:
        return {"error": self.message, "code": self.code, **self.detail}


# ---- request body and images (4xx)


class BadRequest(SymguardError):
    status, code = 422, "bad_request"


class NoImage(BadRequest):
    code = "no_image"


class InvalidBase64(BadRequest):
    code = "invalid_base64"


class CorruptImage(BadRequest):
    code = "corrupt_image"


class InvalidTensor(BadRequest):
    code = "invalid_tensor"


class UnsupportedMediaType(SymguardError):
    status, code = 415, "unsupported_media_type"


class BodyTimeout(SymguardError):
    """The body did not arrive within body_timeout_s (a slow-drip client): answered, and the connection closed."""

    status, code = 408, "body_timeout"
    headers = {"Connection": "close"}


class PayloadTooLarge(SymguardError):
    status, code = 413, "payload_too_large"


class TooManyPixels(PayloadTooLarge):
    code = "too_many_pixels"


class TooManyImages(PayloadTooLarge):
    code = "too_many_images"


# ---- auth


class Unauthorized(SymguardError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class AdminDisabled(SymguardError):
    status, code = 403, "admin_disabled"


# ---- models and capacity


class ModelNotFound(SymguardError):
    status, code = 404, "model_not_found"


class ModelNotReady(SymguardError):
    status, code = 503, "model_not_ready"


class QueueFull(SymguardError):
    status, code = 503, "queue_full"
    headers = {"Retry-After": "1"}


class Overloaded(SymguardError):
    status, code = 503, "overloaded"
    headers = {"Retry-After": "1"}


class InferenceTimeout(SymguardError):
    status, code = 504, "inference_timeout"


class ShuttingDown(SymguardError):
    status, code = 503, "shutting_down"
    headers = {"Retry-After": "1"}


# ---- the guard proxy (`symguard guard`): its own answers, never the upstream's


class OodInput(SymguardError):
    """Gate mode refused an image outside the learned poses. 422: the request is well-formed but its content is
    outside what the classifier behind the guard can handle; sending it again will not help (unlike a 503)."""

    status, code = 422, "ood_input"

    def __init__(self, message: str, headers: dict[str, str] | None = None, **detail: object) -> None:
        super().__init__(message, **detail)
        self.headers = headers or {}  # the X-Symguard-* score headers, so a rejection carries its evidence


class ScoringUnavailable(SymguardError):
    """fail_closed: the image could not be scored in time (or at all), so it is not forwarded."""

    status, code = 503, "scoring_unavailable"
    headers = {"Retry-After": "1"}


class UpstreamUnavailable(SymguardError):
    status, code = 502, "upstream_unavailable"


class UpstreamTimeout(SymguardError):
    status, code = 504, "upstream_timeout"


# ---- loading a bundle (reported by reload as 409; at startup they keep the server unready)


class BundleError(SymguardError):
    status, code = 409, "bundle_error"


class IntegrityError(BundleError):
    code = "integrity_error"


class SelfCheckFailed(BundleError):
    code = "self_check_failed"


class CudaUnavailable(BundleError):
    code = "cuda_unavailable"


def error_response(exc: SymguardError) -> Response:
    """The one mapping from a typed error to an HTTP response (used by api.py's handler and the body-limit middleware)."""
    return Response(
        orjson.dumps(exc.body()), status_code=exc.status, headers=exc.headers, media_type="application/json"
    )
