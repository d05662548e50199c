"""End to end: a real symguard server, a real Prometheus scraping it, a real Alertmanager, the shipped OOD rule.

Upright digits keep SymguardOODRateHigh silent; turned digits make it fire, and Alertmanager delivers it to a
webhook, grouped by (alertname, model) as the shipped alertmanager.yml says.

What is changed from the shipped files, so that this runs in seconds instead of minutes (and nothing else):
  * alerts.yml: only the SymguardOODRateHigh rule is kept. In its expression every `[5m]` window becomes `[10s]`
    and `for: 2m` becomes `for: 2s`; its threshold (10%), volume floor and labels are untouched. The group is
    evaluated every 1s.
  * Prometheus: scrape and evaluation interval 1s, one job "symguard" scraping the test server on 127.0.0.1.
  * alertmanager.yml: group_wait/group_interval shortened to 1s and the webhook URL pointed at a receiver in
    this test; routes, grouping and the inhibit rule are untouched.

The traffic is real MNIST test digits. Which images count as in-distribution or shifted is decided by the served
model itself (its /v1/score verdict), so the test checks the alerting pipeline, not the model's accuracy (that is
models/RESULTS.md's job): the in-distribution phase sends upright digits the model calls "in", the shifted phase
sends rotated/mirrored digits it calls "ood".
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from _deploy_tools import ALERTMANAGER_CONFIG, ALERTS, DEPLOY, Child, free_port, tool
from _support import LiveServer, moved_png

MODEL = "mnist-multiple-flip"  # the shipped default bundle
ALERT = "SymguardOODRateHigh"
BATCH = 8  # images per request
SEND_PERIOD_S = 0.1  # one request every 0.1 s: ~80 images/s, far above the rule's volume floor (0.05/s)


def e2e_rule() -> dict:
    """The shipped SymguardOODRateHigh rule with the windows shortened as the module docstring says."""
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert "[5m]" in rule["expr"] and rule["for"] == "2m"
    rule = {**rule, "expr": rule["expr"].replace("[5m]", "[10s]"), "for": "2s"}
    assert "[5m]" not in rule["expr"]
    return rule


def select(server: LiveServer, candidates: list[bytes], verdict: str, want: int) -> list[bytes]:
    """The first `want` candidate images the served model gives `verdict`."""
    chosen: list[bytes] = []
    with server.client() as c:
        for i in range(0, len(candidates), 64):
            chunk = candidates[i : i + 64]
            r = c.post(f"/v1/score?model={MODEL}", files=[("f", b) for b in chunk])
            r.raise_for_status()
            chosen += [b for b, row in zip(chunk, r.json()["results"]) if row["verdict"] == verdict]
            if len(chosen) >= want:
                return chosen[:want]
    raise AssertionError(f"only {len(chosen)} of {len(candidates)} candidates are {verdict!r} for {MODEL}")


class Traffic(threading.Thread):
    """Sends self.images (switchable) to /v1/score in batches of BATCH, every SEND_PERIOD_S, until stopped."""

    def __init__(self, url: str, images: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.url, self.images, self.sent, self.errors = url, images, 0, []
        self._halt = threading.Event()

    def run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._halt.is_set():
                images = self.images
                batch = [images[(i + j) % len(images)] for j in range(BATCH)]
                i += BATCH
                try:
                    r = c.post(f"/v1/score?model={MODEL}", files=[("f", b) for b in batch])
                    if r.status_code != 200:
                        self.errors.append(r.status_code)
                    self.sent += len(batch)
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                self._halt.wait(SEND_PERIOD_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Webhook:
    """A tiny HTTP server collecting Alertmanager's webhook payloads."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def alertmanager_config(webhook_url: str) -> dict:
    cfg = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for route in [cfg["route"], *cfg["route"].get("routes", [])]:
        route["group_wait"] = route["group_interval"] = "1s"
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    return cfg


def start_alertmanager(tmp: Path, config: dict) -> tuple[Child, str]:
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    am = Child(
        [
            tool("prometheus-alertmanager", "alertmanager"),
            f"--config.file={path}",
            f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no HA gossip: one instance, no extra port
        ],
        tmp / "alertmanager.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        am.wait_http(f"{url}/-/ready")
    except BaseException:
        am.stop()
        raise
    return am, url


def prom_query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def prom_alerts(prom: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/alerts", timeout=5)
    r.raise_for_status()
    return [a for a in r.json()["data"]["alerts"] if a["labels"]["alertname"] == ALERT]


def wait_for(what: str, check, timeout: float, logs: list[Child]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s\n" + "\n".join(c.log() for c in logs))


def test_ood_alert_silent_on_upright_digits_fires_on_turned_digits(tmp_path, mnist_digits):
    prometheus = tool("prometheus")
    digits, _ = mnist_digits
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with LiveServer(model=MODEL, max_delay_ms=2) as server, Webhook() as webhook:
        upright = select(server, [moved_png(d, 0, False) for d in digits[:300]], "in", 64)
        # the calibrated verdict flags only some turned digits (α = 1%, and the default's classes are meant to be
        # rotated by up to 162°): draw from every non-identity element of D4, over enough digits to find 48
        elements = [(k, m) for m in (False, True) for k in range(4) if (k, m) != (0, False)]
        turned = select(server, [moved_png(d, k, m) for d in digits[:800] for k, m in elements], "ood", 48)
        am, am_url = start_alertmanager(tmp_path, alertmanager_config(webhook.url))
        port = free_port()
        prom_url = f"http://127.0.0.1:{port}"
        target = server.url.removeprefix("http://")
        (tmp_path / "rules.yml").write_text(
            yaml.safe_dump({"groups": [{"name": "symguard-e2e", "interval": "1s", "rules": [e2e_rule()]}]})
        )
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(tmp_path / "rules.yml")],
                    "alerting": {
                        "alertmanagers": [{"static_configs": [{"targets": [am_url.removeprefix("http://")]}]}]
                    },
                    "scrape_configs": [{"job_name": "symguard", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        traffic = Traffic(server.url, upright)
        with am, Child(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            tmp_path / "prometheus.log",
        ) as prom:
            try:
                prom.wait_http(f"{prom_url}/-/ready")
                timings["setup_s"] = time.monotonic() - t0
                traffic.start()
                wait_for(
                    "target up",
                    lambda: prom_query(prom_url, 'up{job="symguard"} == 1'),
                    15,
                    [prom],
                )
                # In-distribution phase: wait until the rule's own volume term sees the traffic, then watch for
                # 4 more seconds (4 evaluations, each over >= 4 scrapes) that the alert stays inactive.
                volume = 'sum by (job, model) (rate(symguard_decisions_total{model="%s"}[10s])) > 0.05' % MODEL
                wait_for("upright traffic visible to the rule", lambda: prom_query(prom_url, volume), 15, [prom])
                ood_share = (
                    'sum by (model) (rate(symguard_decisions_total{decision="ood",model="%s"}[10s]))'
                    ' / sum by (model) (rate(symguard_decisions_total{model="%s"}[10s]))' % (MODEL, MODEL)
                )
                quiet_until = time.monotonic() + 4
                while time.monotonic() < quiet_until:
                    assert prom_alerts(prom_url) == [], "OOD alert on upright, in-distribution traffic"
                    time.sleep(0.5)
                (share,) = prom_query(prom_url, ood_share)
                assert float(share["value"][1]) == 0.0  # the rule was computing on data, and found none ood
                rules = httpx.get(f"{prom_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
                (rule,) = [r for g in rules for r in g["rules"] if r["name"] == ALERT]
                assert rule["health"] == "ok" and rule["state"] == "inactive", rule

                # Shifted phase: the same traffic rate, now turned digits.
                traffic.images = turned
                t_shift = time.monotonic()
                pending = wait_for("alert pending or firing", lambda: prom_alerts(prom_url), 20, [prom])
                timings["to_pending_s"] = time.monotonic() - t_shift
                firing = wait_for(
                    "alert firing",
                    lambda: [a for a in prom_alerts(prom_url) if a["state"] == "firing"],
                    20,
                    [prom],
                )
                timings["to_firing_s"] = time.monotonic() - t_shift
                (alert,) = firing
                assert alert["labels"]["model"] == MODEL and alert["labels"]["job"] == "symguard"
                assert alert["labels"]["severity"] == "warning"
                assert alert["annotations"]["runbook"] == "docs/runbook.md#symguardoodratehigh"
                assert alert["annotations"]["summary"].startswith(f"{MODEL}: ")
                assert pending[0]["labels"]["model"] == MODEL

                # Alertmanager groups it by (alertname, model) and delivers it to the webhook.
                def delivered():
                    return [
                        p
                        for p in webhook.received
                        if p["status"] == "firing" and p["groupLabels"].get("alertname") == ALERT
                    ]

                (payload, *_) = wait_for("webhook delivery", delivered, 15, [prom, am])
                timings["to_webhook_s"] = time.monotonic() - t_shift
                assert payload["groupLabels"] == {"alertname": ALERT, "model": MODEL}
                assert payload["receiver"] == "symguard-webhook"
                assert payload["alerts"][0]["annotations"]["runbook"] == "docs/runbook.md#symguardoodratehigh"

                # While real data is in Prometheus: every Grafana dashboard query parses and runs, and the
                # detector panels (not the guard-only ones: this server is `serve`) show data.
                empty = dashboard_queries_without_data(prom_url)
                assert all("symguard_guard_" in e for e in empty), empty
            finally:
                traffic.stop()
    assert not traffic.errors, traffic.errors[:5]
    print("timings", {k: round(v, 1) for k, v in timings.items()}, "images sent", traffic.sent)


def dashboard_queries_without_data(prom: str) -> list[str]:
    """Run every dashboard query with Grafana's variables filled in; fail on any error, return the empty ones."""
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "symguard.json").read_text())
    subs = {"$__rate_interval": "5s", "$__range": "1m", "$model": ".*", "$job": ".*"}
    empty = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in subs.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, expr
            r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "success", (panel["title"], expr, r.text)
            if not r.json()["data"]["result"]:
                empty.append(target["expr"])
    return empty


def _am_alert(name: str, job: str, **labels: str) -> dict:
    return {"labels": {"alertname": name, "job": job, **labels}, "annotations": {"summary": name}}


def test_alertmanager_inhibits_distribution_alerts_while_detector_down(tmp_path):
    """The shipped inhibit rule, in a real Alertmanager: SymguardDown silences OOD alerts of its job only."""
    with Webhook() as webhook:
        am, url = start_alertmanager(tmp_path, alertmanager_config(webhook.url))
        with am:
            alerts = [
                _am_alert("SymguardOODRateHigh", "symguard", model="m1", severity="warning"),
                _am_alert("SymguardReflectionRateHigh", "symguard", model="m1", severity="warning"),
                _am_alert("SymguardOODRateHigh", "other", model="m1", severity="warning"),
                _am_alert("SymguardLatencyP99High", "symguard", severity="warning"),
                _am_alert("SymguardDown", "symguard", instance="a:8000", severity="critical"),
            ]
            httpx.post(f"{url}/api/v2/alerts", json=alerts, timeout=5).raise_for_status()

            def states():
                got = httpx.get(f"{url}/api/v2/alerts", timeout=5).json()
                out = {(a["labels"]["alertname"], a["labels"]["job"]): a["status"]["state"] for a in got}
                return out if len(out) == len(alerts) and "unprocessed" not in out.values() else None

            seen = wait_for("alertmanager processed the alerts", states, 10, [am])
    assert seen[("SymguardOODRateHigh", "symguard")] == "suppressed"
    assert seen[("SymguardReflectionRateHigh", "symguard")] == "suppressed"
    assert seen[("SymguardOODRateHigh", "other")] == "active"  # another job's detector is fine
    assert seen[("SymguardLatencyP99High", "symguard")] == "active"  # not a distribution alert
    assert seen[("SymguardDown", "symguard")] == "active"
