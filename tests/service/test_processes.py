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


def test_the_guard_runs_as_several_processes(bundle_repo, upstream, mnist_digits):
    """`symguard guard --processes 2`: the guard's own settings reach the workers (mode, upstream, prefix), and its
    counters add up over both processes."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYMGUARD_", "PROMETHEUS_"))}
    proc = subprocess.Popen(
        [*SYMGUARD, "guard", "--processes", "2", "--port", str(port), "--repository", str(bundle_repo),
         "--upstream", upstream.url, "--mode", "annotate", "--intra-op-threads", "1", "--inference-workers", "1",
         "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    g = Cluster(proc, f"http://127.0.0.1:{port}")
    try:
        g.pids_answering(2)
        image = png(pad29(mnist_digits[0][3]))
        for _ in range(10):
            r = g.fresh("POST", "/predict", content=image, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.headers["x-symguard-verdict"] in ("in", "ood")  # annotate: the score rides along
        assert g.fresh("POST", "/symguard/v1/score", content=image, headers={"content-type": "image/png"}).status_code == 200
        for _ in range(3):
            text = g.fresh("GET", "/metrics").text
            assert _metric(text, "symguard_guard_requests_total", mode="annotate", outcome="forwarded") == 10
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_readyz_is_unready_while_any_sibling_process_is(bundle_repo, tmp_path, monkeypatch):
    """A load balancer sends to the port, not to one process: /readyz (and /v2/health/ready) say 503 while a live
    sibling reports not ready. The sibling here is a real process whose pid is registered in the shared folder."""
    from _support import LiveServer

    monkeypatch.setenv("SYMGUARD_WORKER_DIR", str(tmp_path))  # as serve_processes sets it for its workers
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    entry = tmp_path / "reload" / "processes" / str(sibling.pid)
    try:
        with LiveServer(repository=bundle_repo) as s, s.client() as c:
            assert c.get("/readyz").status_code == 200  # registered itself ready, no sibling yet
            entry.write_text('{"ready": false}')
            r = c.get("/readyz")
            assert r.status_code == 503 and f"process {sibling.pid}" in r.json()["problems"], r.text
            assert c.get("/v2/health/ready").status_code == 503
            entry.write_text('{"ready": true}')
            assert c.get("/readyz").status_code == 200
            entry.write_text('{"ready": false}')
            sibling.kill()
            sibling.wait()
            assert c.get("/readyz").status_code == 200  # a dead process's file no longer counts
    finally:
        sibling.kill()


def test_workers_stop_when_their_supervisor_is_killed(bundle_repo):
    """SIGKILL (or the OOM killer) on the parent: the workers must not keep serving the port unsupervised."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYMGUARD_", "PROMETHEUS_"))}
    proc = subprocess.Popen(
        [*SYMGUARD, "serve", "--processes", "2", "--port", str(port), "--repository", str(bundle_repo),
         "--intra-op-threads", "1", "--inference-workers", "1", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers = set(Cluster(proc, f"http://127.0.0.1:{port}").pids_answering(2))
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {sorted(p for p in workers if _alive(p))} outlived their parent"
        time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _alive(pid: int) -> bool:
    """Running, not a zombie (orphans are reaped by init, not by this test)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
