"""symguard guard settings, image locations, body rewriting, and the `symguard guard` command as users run it."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from _guard_support import EchoUpstream, free_port, multipart_parts
from _support import png
from pydantic import ValidationError

from bench.workload import NotReady, wait_ready
from service.errors import InvalidBase64
from service.guard_config import GuardSettings, ImageLocation
from service.guard_image import locate

BIN = Path(sys.executable).parent / "symguard"
SYMGUARD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "service.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYMGUARD_")}
    return {**env, "SYMGUARD_INTRA_OP_THREADS": "1", **extra}


# ---------------------------------------------------------------- settings


def test_image_locations_parse_and_reject():
    assert ImageLocation.parse("raw") == ImageLocation("raw")
    assert ImageLocation.parse("multipart:file") == ImageLocation("multipart", field="file")
    assert ImageLocation.parse("json:/a~1b/0/c~0d").pointer == ("a/b", "0", "c~d")  # RFC 6901 escapes
    for bad in ("raw:x", "multipart:", "json:image", "json:", "body", ""):
        with pytest.raises(ValueError):
            ImageLocation.parse(bad)
    with pytest.raises(ValidationError, match="multipart:FIELD"):
        GuardSettings(upstream="http://h", image_location="multipart")


def test_upstream_must_be_an_http_url():
    assert GuardSettings(upstream="http://h:9/base/").upstream == "http://h:9/base"
    for bad in ("ftp://h", "h:9", "http://h/?q=1", ""):
        with pytest.raises(ValidationError):
            GuardSettings(upstream=bad)


def test_guard_env_wins_over_the_shared_server_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SYMGUARD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SYMGUARD_PORT", "9100")  # shared with `symguard serve`
    monkeypatch.setenv("SYMGUARD_MODE", "annotate")
    monkeypatch.setenv("SYMGUARD_GUARD_MODE", "gate")
    monkeypatch.setenv("SYMGUARD_GUARD_UPSTREAM", "http://up:1")
    s = GuardSettings()
    assert (s.port, s.mode, s.upstream) == (9100, "gate", "http://up:1")
    assert (s.on_failure, s.api_prefix, s.image_location) == ("fail_open", "/symguard", "raw")


# ---------------------------------------------------------------- finding and replacing the image


def test_json_pointer_into_arrays_and_replacement_round_trip():
    loc = ImageLocation.parse("json:/batch/1/img")
    doc = {"batch": [{"img": "x"}, {"img": base64.b64encode(b"IMG").decode(), "keep": True}], "n": 2}
    found = asyncio.run(locate(orjson.dumps(doc), "application/json; charset=utf-8", loc))
    assert found is not None and found.data == b"IMG"
    body, ctype = found.replaced(b"NEW")
    out = orjson.loads(body)
    assert ctype == "application/json" and base64.b64decode(out["batch"][1]["img"]) == b"NEW"
    assert out["batch"][0] == {"img": "x"} and out["batch"][1]["keep"] is True and out["n"] == 2
    assert doc["batch"][1]["img"] != out["batch"][1]["img"]  # the parsed original is not mutated
    for absent in ({"batch": [{"img": "x"}]}, {"batch": {"1": 0}}, {"batch": [0, 1]}, [1, 2]):
        assert asyncio.run(locate(orjson.dumps(absent), "application/json", loc)) is None
    with pytest.raises(InvalidBase64):
        asyncio.run(locate(orjson.dumps({"batch": [0, {"img": ["no"]}]}), "application/json", loc))


def test_multipart_replacement_keeps_every_other_part_in_order():
    files = [("image", ("pic.jpg", b"JPEG", "image/jpeg")), ("image", ("two.png", b"PNG2", "image/png"))]
    req = httpx.Request("POST", "http://x", data={"a": "1"}, files=files)
    body = req.read()
    found = asyncio.run(locate(body, req.headers["content-type"], ImageLocation.parse("multipart:image")))
    assert found is not None and found.data == b"JPEG"  # the first file under the field
    new, ctype = found.replaced(b"CANON")
    parts = multipart_parts(new, ctype)
    assert [(p[0], p[1], p[3]) for p in parts] == [("a", None, b"1"), ("image", "pic.png", b"CANON"),
                                                   ("image", "two.png", b"PNG2")]  # fmt: skip
    assert parts[1][2] == "image/png"


# ---------------------------------------------------------------- the command


def test_guard_help_and_missing_upstream():
    helped = subprocess.run([*SYMGUARD, "guard", "--help"], capture_output=True, text=True, timeout=60, env=_env())
    missing = subprocess.run([*SYMGUARD, "guard"], capture_output=True, text=True, timeout=60, env=_env())
    assert helped.returncode == 0
    for flag in ("--upstream", "--mode", "monitor,annotate,gate,canonicalize", "--image-location", "--score-timeout-s",
                 "--on-failure", "fail_open,fail_closed", "--upstream-timeout-s", "--model", "--api-prefix",
                 "SYMGUARD_GUARD_UPSTREAM", "--max-batch"):  # fmt: skip
        assert flag in helped.stdout, flag
    assert missing.returncode == 2 and "upstream" in missing.stderr and "Traceback" not in missing.stderr


def test_symguard_guard_process_end_to_end_then_sigterm(bundle_repo, mnist_digits):
    """The real command, configured by env and flags, in front of the echo upstream mounted under a base path."""
    digits, _ = mnist_digits
    port = free_port()
    with EchoUpstream() as up:
        proc = subprocess.Popen(
            [*SYMGUARD, "guard", "--mode", "annotate", "--port", str(port), "--model", "digits:1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(SYMGUARD_REPOSITORY=str(bundle_repo), SYMGUARD_GUARD_UPSTREAM=f"{up.url}/base/"),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(f"{url}/readyz", proc, 60, poll_s=0.1)
            except NotReady as e:
                raise AssertionError(f"{e}: {proc.stdout.read() if proc.stdout and proc.poll() is not None else ''}")
            r = httpx.post(f"{url}/predict?x=1", content=png(digits[0]), headers={"content-type": "image/png"})
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/base/predict" and r.json()["query"] == "x=1"
    assert r.headers["x-symguard-model"] == "digits:1" and r.headers["x-symguard-verdict"] in ("in", "ood")
    assert code == 0
