"""Access over real HTTP: bearer tokens for scoring and admin routes, admin routes off without a token, the default
bind address, and model names that can never reach a file path outside the repository."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import httpx
import orjson
import pytest
from _support import LiveServer, png
from fastapi.routing import APIRoute

from service.auth import require_admin
from service.kserve import router as v2_router
from service.routes_v1 import health_router
from service.routes_v1 import router as v1_router

ADMIN = "admin-S3cret-token"
API = "score-S3cret-token"
PNG = {"content-type": "image/png"}


def _bearer(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"authorization": f"{scheme} {token}"}


def _err(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"], body
    return body


@pytest.fixture(scope="module")
def layout(bundle_repo, tmp_path_factory) -> tuple[Path, Path]:
    """repo/digits/1, and beside the repository (outside it) a valid bundle outside/digits/1: a traversal that
    escaped the repository would find a bundle that verifies, so a 200 would show it."""
    root = tmp_path_factory.mktemp("access")
    shutil.copytree(bundle_repo, root / "repo")
    shutil.copytree(bundle_repo / "digits", root / "outside" / "digits")
    return root / "repo", root / "outside" / "digits"


@pytest.fixture(scope="module")
def locked(layout) -> Iterator[LiveServer]:
    """Both tokens configured."""
    with LiveServer(repository=layout[0], admin_token=ADMIN, api_token=API) as s:
        yield s


def _routes() -> list[APIRoute]:
    """Every route symguard defines (the routers the app includes), so a new route is covered automatically."""
    return [r for router in (v1_router, health_router, v2_router) for r in router.routes if isinstance(r, APIRoute)]


def _admin_routes() -> list[APIRoute]:
    return [r for r in _routes() if any(d.dependency is require_admin for d in r.dependencies)]


def _scoring_routes() -> list[APIRoute]:
    """Every POST route that is not an admin route: each must want the API token, however it checks it (the /v1
    routes call require_api themselves, the /v2 routes declare it as a dependency)."""
    admin = _admin_routes()
    return [r for r in _routes() if "POST" in r.methods and r not in admin]


def _url(route: APIRoute) -> str:
    return route.path.replace("{name}", "digits").replace("{version}", "1")


# ---------------------------------------------------------------- admin routes


def test_admin_routes_are_off_without_an_admin_token(server):
    routes = _admin_routes()
    assert [r.path for r in routes] == ["/v1/models/{name}/reload"]  # the one admin route today
    with server.client() as c:
        for route in routes:
            for headers in ({}, _bearer("anything"), {"authorization": "Bearer"}):
                body = _err(c.request(next(iter(route.methods)), _url(route), headers=headers), 403, "admin_disabled")
                assert "--admin-token" in body["error"] and "SYMGUARD_ADMIN_TOKEN" in body["error"]  # how to turn on


def test_admin_routes_are_off_behind_the_guard_too(guard):
    g = guard()  # no admin token: its own API under /symguard is just as closed
    with g.client() as c:
        _err(c.post("/symguard/v1/models/digits/reload", headers=_bearer(ADMIN)), 403, "admin_disabled")


def test_admin_routes_need_exactly_the_admin_token(locked):
    near_misses: list[dict[str, str | bytes]] = [
        {}, {"authorization": "Bearer"}, _bearer(API),  # the scoring token is not an admin token
        _bearer(ADMIN[:-1]), _bearer(ADMIN + "x"), _bearer(ADMIN.upper()), _bearer(ADMIN, "Basic"),
        {"authorization": ADMIN}, {"x-api-key": ADMIN},
        {"authorization": b"Bearer " + ADMIN.encode() + b"\xc3\xa9"},  # raw UTF-8 after the right token
    ]  # fmt: skip
    with locked.client() as c:
        for route in _admin_routes():
            method = next(iter(route.methods))
            for headers in near_misses:
                r = c.request(method, _url(route), headers=headers)
                _err(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            ok = c.request(method, _url(route), headers=_bearer(ADMIN, "bearer"))  # the scheme is case-insensitive
            assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------- scoring token


def test_every_scoring_route_needs_a_token_when_one_is_configured(locked, mnist_digits):
    digits, _ = mnist_digits
    image = png(digits[0])
    routes = _scoring_routes()
    assert {"/v1/score", "/v1/canonicalize", "/v2/models/{name}/infer"} <= {r.path for r in routes}
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
    with locked.client() as c:
        for route in routes:
            send = (lambda h, u=_url(route): c.post(u, json=v2, headers=h)) if "/v2/" in route.path \
                else (lambda h, u=_url(route): c.post(u, content=image, headers={**PNG, **h}))  # fmt: skip
            for headers in ({}, _bearer("nope"), _bearer(API[:-1]), _bearer(API, "Basic")):
                _err(send(headers), 401, "unauthorized")
            assert send(_bearer(API)).status_code == 200, route.path
            assert send(_bearer(ADMIN)).status_code == 200, route.path  # the admin token may score too
        # liveness, readiness and metrics stay open: probes and Prometheus carry no token
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_scoring_is_open_without_a_token(server, mnist_digits):
    digits, _ = mnist_digits
    with server.client() as c:
        assert c.post("/v1/score", content=png(digits[0]), headers=PNG).status_code == 200


# ---------------------------------------------------------------- model names never become paths

# Raw URL fragments: percent-encoded as an attacker would send them, so the server does the decoding.
HOSTILE_NAMES: list[bytes] = [
    b"..", b"../outside/digits", b"..%2Foutside%2Fdigits", b"%2e%2e%2foutside%2fdigits", b"%252e%252e%252f",
    b"%2Fetc%2Fpasswd", b"digits%2F..%2F..%2Foutside%2Fdigits", b".%2Fdigits", b"..%5Coutside%5Cdigits", b"C:%5Cx",
    b"digits%00", b"%00", b"%c0%ae%c0%ae", b"a" * 10_000, b"digits:1", b"-digits", b".digits",
]  # fmt: skip


def _raw(url: str, method: str, target: bytes, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One request with the request-target exactly as given (httpx would normalise '..' and re-encode)."""
    host, port = url.removeprefix("http://").split(":")
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in {**headers, "content-length": str(len(body))}.items())
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n"
                  + body)  # fmt: skip
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _expected(name: bytes, in_path: bool) -> tuple[int, str]:
    """A decoded '/' in a path segment means no route matches (404 http_404); anything else that is not a
    model name is 404 model_not_found. In a query, `NAME:VERSION` is a valid reference, naming a served model."""
    if in_path and b"/" in unquote_to_bytes(name):
        return 404, "http_404"
    return 404, "model_not_found"


def test_model_names_from_requests_never_reach_the_filesystem(locked, layout, mnist_digits):
    digits, _ = mnist_digits
    image = png(digits[0])
    v2 = b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": []}]}'
    admin, api = {**_bearer(ADMIN)}, {**_bearer(API)}
    seen = 0
    absolute = quote(str(layout[1])).encode()  # the outside bundle's own absolute path, percent-encoded
    for name in [*HOSTILE_NAMES, absolute]:
        attempts = [
            ("POST", b"/v1/score?model=" + name, {**api, **PNG}, image, False),
            ("POST", b"/v1/canonicalize?model=" + name, {**api, **PNG}, image, False),
            ("POST", b"/v2/models/" + name + b"/infer", {**api, "content-type": "application/json"}, v2, True),
            ("POST", b"/v2/models/digits/versions/" + name + b"/infer", {**api, "content-type": "application/json"},
             v2, True),
            ("GET", b"/v2/models/" + name, api, b"", True),
            ("GET", b"/v2/models/" + name + b"/ready", api, b"", True),
            ("POST", b"/v1/models/" + name + b"/reload", admin, b"", True),
            ("POST", b"/v1/models/digits/reload?version=" + name, admin, b"", False),
        ]  # fmt: skip
        for method, target, headers, body, in_path in attempts:
            if name == b"digits:1" and not in_path:
                continue  # a valid NAME:VERSION in ?model= (checked below: it is served from the repository)
            status, raw = _raw(locked.url, method, target, headers, body)
            got = orjson.loads(raw)
            # ?version= must be an integer >= 1 (FastAPI's own validation); the rest as _expected says
            want = (422, "invalid_request") if b"?version=" in target else _expected(name, in_path)
            assert (status, got.get("code")) == want, (method, target[:80], status, got)
            assert got["error"], got
            seen += 1
    assert seen > 100
    with httpx.Client(base_url=locked.url, timeout=30, headers=_bearer(API)) as c:
        served = c.get("/v1/models").json()["models"]
        pinned = c.post("/v1/score", params={"model": "digits:1"}, content=image, headers=PNG)
    assert [m["name"] for m in served] == ["digits"]  # nothing outside the repository was ever loaded
    assert pinned.status_code == 200 and pinned.json()["version"] == 1


# ---------------------------------------------------------------- bind address


def _non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (no packet is sent), or None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _serve(repo: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYMGUARD_")}
    env["SYMGUARD_INTRA_OP_THREADS"] = "1"
    bin_ = Path(sys.executable).parent / "symguard"
    cmd = [str(bin_)] if bin_.exists() else [sys.executable, "-m", "service.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--repository", str(repo), "--port", str(port), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not _reachable("127.0.0.1", port) and not (args and _reachable(args[-1], port)):
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    return proc, port


def test_default_bind_is_loopback_only_and_elsewhere_is_explicit(bundle_repo):
    from service.config import Settings
    from service.guard_config import GuardSettings

    assert Settings().host == "127.0.0.1"
    assert GuardSettings(upstream="http://127.0.0.1:1").host == "127.0.0.1"
    ip = _non_loopback_ipv4()
    proc, port = _serve(bundle_repo)  # no --host, no SYMGUARD_HOST
    try:
        assert _reachable("127.0.0.1", port)
        if ip is not None:
            assert not _reachable(ip, port), f"listening on {ip} without being asked to"
    finally:
        proc.terminate()
        proc.wait(30)
    if ip is None:
        pytest.skip("no non-loopback IPv4 address to check the other half against")
    proc, port = _serve(bundle_repo, "--host", ip)  # binding elsewhere: an explicit flag
    try:
        assert _reachable(ip, port)
        assert httpx.get(f"http://{ip}:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
