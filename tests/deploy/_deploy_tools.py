"""Helpers for tests/deploy: where the shipped configs are, the Prometheus tool binaries, child processes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench.workload import NotReady, free_port, wait_ready  # noqa: F401  (free_port: re-exported for the tests here)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
INSTALL_HINT = "apt-get install prometheus prometheus-alertmanager (.ci/run installs them)"


def tool(name: str, *alternatives: str) -> str:
    """Path of a Prometheus-stack binary, or skip the test saying which package provides it."""
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path:
            return path
    pytest.skip(f"{name} is not installed: {INSTALL_HINT}")


class Child:
    """A child process whose output goes to a log file; stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log_path = args, log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        try:
            wait_ready(url, self.proc, timeout, poll_s=0.1)
        except NotReady as e:
            raise RuntimeError(f"{self.args[0]}: {e}:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_tool(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
