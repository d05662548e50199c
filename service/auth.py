"""Bearer tokens: admin routes are off unless an admin token is configured; scoring is open unless an API token is.

The checks are `async def` although they never await: FastAPI runs a plain `def` dependency on its thread pool, a
thread hop per request that cost ~14% of the event loop's time under single-image load."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.requests import Request

from service.errors import AdminDisabled, Unauthorized


def _bearer(request: Request) -> bytes | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: bytes | None, expected: SecretStr) -> bool:
    # compare_digest: the time taken does not reveal how many leading characters were right
    return given is not None and hmac.compare_digest(given, expected.get_secret_value().encode())


async def require_admin(request: Request) -> None:
    token: SecretStr | None = request.app.state.settings.admin_token
    if token is None:
        raise AdminDisabled("admin routes are disabled: start the server with --admin-token (or SYMGUARD_ADMIN_TOKEN)")
    if not _matches(_bearer(request), token):
        raise Unauthorized("admin route: missing or wrong bearer token")


async def require_api(request: Request) -> None:
    settings = request.app.state.settings
    if settings.api_token is None:
        return
    given = _bearer(request)
    if _matches(given, settings.api_token) or (
        settings.admin_token is not None and _matches(given, settings.admin_token)
    ):
        return
    raise Unauthorized("missing or wrong bearer token")
