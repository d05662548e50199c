"""The `symguard` entry point as users run it (subprocesses), the no-torch rule, and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from _support import hold_request, png

BIN = Path(sys.executable).parent / "symguard"
SYMGUARD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "service.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYMGUARD_")}
    return {**env, "SYMGUARD_INTRA_OP_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_live(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server never became live")


def test_service_never_imports_torch(bundle_repo, tmp_path, mnist_digits):
    digits, _ = mnist_digits
    (tmp_path / "a.png").write_bytes(png(digits[0]))
    code = f"""
import importlib, pkgutil, sys, contextlib, io
import service
for m in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(m.name)
from service.api import create_app
from service.config import Settings
create_app(Settings(repository={str(bundle_repo)!r}))
from service.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["score", "--repository", {str(bundle_repo)!r}, {str(tmp_path / "a.png")!r}]) == 0
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m == "models.export")
print("IMPORTED", bad)
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IMPORTED []" in r.stdout


def test_symguard_score_prints_the_server_json(server, bundle_repo, tmp_path, mnist_digits):
    digits, _ = mnist_digits
    paths = []
    for i in (0, 2500, 4999):
        p = tmp_path / f"digit{i}.png"
        p.write_bytes(png(digits[i]))
        paths.append(p)
    r = subprocess.run(
        [*SYMGUARD, "score", *map(str, paths)], capture_output=True, text=True, timeout=120,
        env=_env(SYMGUARD_REPOSITORY=str(bundle_repo)),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    with server.client() as c:
        remote = c.post("/v1/score", files=[("f", p.read_bytes()) for p in paths]).json()
    assert local["model"] == "digits" and len(local["results"]) == 3
    assert local == remote  # same decode, preprocessing, runtime and scoring code


def test_symguard_score_reports_bad_files(bundle_repo, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    r = subprocess.run(
        [*SYMGUARD, "score", "--repository", str(bundle_repo), str(tmp_path / "junk.png")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert r.returncode == 1 and "junk.png" in r.stderr and "supported format" in r.stderr


def test_serve_help_documents_every_setting():
    r = subprocess.run([*SYMGUARD, "serve", "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 0
    for flag in ("--host", "--port", "--repository", "--model", "--max-batch", "--max-delay-ms", "--queue-size",
                 "--intra-op-threads", "--require-cuda", "--admin-token", "--api-token", "--max-body-bytes",
                 "--max-pixels", "--max-images", "--request-timeout-s", "--body-timeout-s", "SYMGUARD_PORT"):  # fmt: skip
        assert flag in r.stdout, flag


def test_top_level_usage_and_training_delegation():
    usage = subprocess.run([*SYMGUARD], capture_output=True, text=True, timeout=60, env=_env())
    export = subprocess.run([*SYMGUARD, "export", "--help"], capture_output=True, text=True, timeout=60, env=_env())
    bench = subprocess.run([*SYMGUARD, "bench", "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert usage.returncode == 2 and all(c in usage.stdout for c in ("serve", "score", "guard"))
    assert export.returncode == 0 and "checkpoint" in export.stdout  # answered by models.cli
    assert bench.returncode == 0 and "--c-processes" in bench.stdout, bench.stderr  # bench/compare.py's own help


def test_require_cuda_refuses_to_start_without_cuda(bundle_repo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = subprocess.run(
        [*SYMGUARD, "serve", "--require-cuda", "--repository", str(bundle_repo), "--port", str(_free_port())],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert r.returncode != 0 and "require_cuda" in r.stderr


def test_serve_with_no_arguments_then_sigterm(tmp_path):
    """`symguard serve` alone: default repository, 127.0.0.1; env only moves the port so tests do not collide."""
    port = _free_port()
    proc = subprocess.Popen(
        [*SYMGUARD, "serve"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(SYMGUARD_PORT=str(port)),
    )
    try:
        _wait_live(f"http://127.0.0.1:{port}", proc)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code in (200, 503) and "ready" in ready.json()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_finishes_in_flight_requests(bundle_repo, mnist_digits):
    """Two requests in flight at SIGTERM, both answered: one waiting in a batch (max_delay 0.9 s, held open by the
    other being in progress), and one whose body is still arriving and completes after the signal."""
    digits, _ = mnist_digits
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*SYMGUARD, "serve", "--repository", str(bundle_repo), "--port", str(port), "--max-delay-ms", "900", "--max-batch", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    result: dict[str, object] = {}
    try:
        _wait_live(url, proc)
        files = [("f", png(digits[i])) for i in range(8)]
        one = png(digits[8])
        held = hold_request(url, one, sent=10)

        def call() -> None:
            try:
                result["response"] = httpx.post(url + "/v1/score", files=files, timeout=30)
            except httpx.HTTPError as e:
                result["error"] = e

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        held.sendall(one[10:])
        held.settimeout(30)
        held_answer = held.recv(65536)
        held.close()
        t.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "error" not in result, result
    r = result["response"]
    assert r.status_code == 200 and len(r.json()["results"]) == 8  # type: ignore[union-attr]
    assert held_answer.startswith(b"HTTP/1.1 200"), held_answer[:200]
    assert code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)
