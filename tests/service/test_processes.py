"""`symguard serve --processes 2`: two real server processes behind one port. /metrics adds both up, a reload
reaches both, a worker that dies is replaced by one serving what its sibling serves, and SIGTERM stops all."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _support import copy_version, pad29, png

BIN = Path(sys.executable).with_name("symguard")
SYMGUARD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "service.cli"]
TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The server under test, and every request this test module made to its /readyz (to check the sums)."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url
        self.readyz_by_code: dict[int, int] = {}

    def fresh(self, method: str, path: str, **kw: object) -> httpx.Response:
        """One request on a new connection, so the kernel may hand it to either process."""
        r = httpx.request(method, self.url + path, timeout=30, headers={"connection": "close", **kw.pop("headers", {})}, **kw)  # type: ignore[arg-type]
        if path == "/readyz":
            self.readyz_by_code[r.status_code] = self.readyz_by_code.get(r.status_code, 0) + 1
        return r

    def pids_answering(self, want: int, tries: int = 300) -> dict[int, httpx.Response]:
        """/readyz on fresh connections until `want` distinct processes answered 200: pid -> its last answer."""
        seen: dict[int, httpx.Response] = {}
        for _ in range(tries):
            try:
                r = self.fresh("GET", "/readyz")
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                seen[r.json()["process"]] = r
                if len(seen) >= want:
                    return seen
            else:
                time.sleep(0.1)
        raise AssertionError(f"only processes {sorted(seen)} answered /readyz in {tries} tries")


@pytest.fixture(scope="module")
def cluster(bundle_repo, tmp_path_factory) -> Iterator[Cluster]:
    repo = tmp_path_factory.mktemp("processes") / "repo"
    shutil.copytree(bundle_repo, repo)
    copy_version(repo, "digits", 1, 2)  # the newest, which a plain start serves
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYMGUARD_", "PROMETHEUS_"))}
    proc = subprocess.Popen(
        [*SYMGUARD, "serve", "--processes", "2", "--port", str(port), "--repository", str(repo),
         "--admin-token", TOKEN, "--intra-op-threads", "1", "--inference-workers", "1", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    c = Cluster(proc, f"http://127.0.0.1:{port}")
    try:
        c.pids_answering(2)
        yield c
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_metrics_add_up_every_process(cluster, mnist_digits):
    digits = mnist_digits[0]
    scored = 0
    for i in range(12):
        r = cluster.fresh("POST", "/v1/score", content=png(pad29(digits[i])), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        scored += 1
    cluster.pids_answering(2)  # both processes answered since the fixture's start, so each holds some counts
    for _ in range(4):  # whichever process answers the scrape, it reports the sum over both
        text = cluster.fresh("GET", "/metrics").text
        assert _metric(text, "symguard_requests_total", endpoint="/v1/score", code="200") == scored
        assert _metric(text, "symguard_decisions_total") == scored
        for code, n in cluster.readyz_by_code.items():
            assert _metric(text, "symguard_requests_total", endpoint="/readyz", code=str(code)) == n
        assert _metric(text, "symguard_ready") == 1
        assert _metric(text, "symguard_model_info", model="digits", version="2") == 1


def test_a_reload_reaches_every_process(cluster):
    r = cluster.fresh("POST", "/v1/models/digits/reload?version=1", headers=AUTH)
    assert r.status_code == 200, r.text
    answers = r.json()["processes"]
    assert len(answers) == 2 and len({a["pid"] for a in answers}) == 2
    assert all(a["version"] == 1 and a["error"] is None for a in answers), answers
    for pid, ready in cluster.pids_answering(2).items():
        assert ready.json()["models"] == [{"name": "digits", "version": 1, "provider": "CPUExecutionProvider"}], pid
    text = cluster.fresh("GET", "/metrics").text
    assert _metric(text, "symguard_model_info", model="digits", version="1") == 1
    assert _metric(text, "symguard_model_info", model="digits", version="2") == 0  # left at 0 in both processes


def test_a_replaced_worker_serves_what_its_sibling_serves(cluster):
    before = set(cluster.pids_answering(2))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:  # uvicorn's supervisor notices within a second or so and starts a replacement
        answers = cluster.pids_answering(2)
        if victim not in answers and len(answers) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement for {victim}: {sorted(answers)}"
    newcomer = (set(answers) - before).pop()
    # the journal says version 1 (the reload above), though version 2 is the newest on disk
    assert answers[newcomer].json()["models"][0]["version"] == 1
    r = cluster.fresh("POST", "/v1/models/digits/reload", headers=AUTH)  # back to the newest, in both
    assert r.status_code == 200, r.text
    assert sorted(a["version"] for a in r.json()["processes"]) == [2, 2]
    assert {a["pid"] for a in r.json()["processes"]} == set(answers)


def test_sigterm_stops_every_process(cluster):
    pids = set(cluster.pids_answering(2))
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(30) == 0, cluster.proc.stdout.read() if cluster.proc.stdout else ""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
