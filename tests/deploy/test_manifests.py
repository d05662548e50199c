"""docker-compose.yml, deploy/Dockerfile, deploy/k8s and deploy/grafana, checked against the code they deploy.

No Docker engine or Kubernetes API runs here, so nothing is started from these files. Instead every reference in
them is resolved against the real thing: commands and flags are parsed by the real CLIs, environment variables
must be real settings, probe paths must be real routes of the real apps, mounted files must exist, and every metric
the dashboard and the alerts use must be exported by a live server's /metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _deploy_tools import ALERTS, DEPLOY, ROOT, tool
from _support import LiveServer, moved_png
from pydantic_settings import BaseSettings, CliApp

from service.api import create_app
from service.config import Settings

K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "symguard.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
MODEL = "mnist-multiple-flip"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.name)}"] = doc
    return docs


def guard_settings() -> type[BaseSettings]:
    try:
        from service.guard_config import GuardSettings
    except ImportError as e:  # pragma: no cover - the guard ships alongside this file
        pytest.fail(f"symguard guard settings not importable: {e}")
    return GuardSettings


def parse_symguard(args: list[str], monkeypatch, env: dict[str, str] | None = None) -> BaseSettings:
    """Parse `symguard SUBCOMMAND ARGS` with the settings class the real CLI uses (nothing is started)."""
    for key in [k for k in os.environ if k.startswith("SYMGUARD_")]:
        monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    sub, rest = args[0], args[1:]
    classes = {"serve": Settings, "guard": guard_settings()}
    assert sub in classes, f"symguard has no server subcommand {sub!r}"
    return CliApp.run(classes[sub], cli_args=rest)


def setting_for_env(key: str, cls: type[BaseSettings]) -> str:
    """SYMGUARD_GUARD_X or SYMGUARD_X -> field x of cls; fails for a variable no setting reads."""
    for prefix in ("SYMGUARD_GUARD_", "SYMGUARD_"):
        if key.startswith(prefix) and key[len(prefix) :].lower() in cls.model_fields:
            return key[len(prefix) :].lower()
    raise AssertionError(f"{key} is not a setting of {cls.__name__}")


def upstream_cli(args: list[str], monkeypatch) -> dict:
    """Run the demo classifier's real main() with uvicorn.run replaced: its argparse accepts args or exits."""
    from service.demo import upstream

    seen: dict = {}
    monkeypatch.setattr(upstream.uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert upstream.main(args) == 0
    return seen


def app_serves(app, path: str, method: str = "GET") -> bool:
    """The app's own routing answers `path` itself (not a 404, not the guard's catch-all proxy route)."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    for route in app.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", None) != "/{path:path}"
    return False


def quantity(q: str | int) -> float:
    """Kubernetes CPU/memory quantities: 250m, 2, 512Mi, 1Gi."""
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


# ---------------------------------------------------------------- docker compose


def test_compose_services_images_and_mounts():
    c = compose()
    services = c["services"]
    assert set(services) == {"symguard", "classifier", "prometheus", "alertmanager", "grafana"}
    for name in ("symguard", "classifier"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in dockerfile_stages()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    # every named volume is declared
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(c.get("volumes", {}))


def test_compose_guard_command_is_a_real_cli_and_points_at_the_classifier(monkeypatch):
    services = compose()["services"]
    guard = parse_symguard(services["symguard"]["command"], monkeypatch)
    assert guard.mode == "canonicalize" and guard.host == "0.0.0.0"
    assert guard.upstream == "http://classifier:9001"
    assert services["symguard"]["ports"] == [f"127.0.0.1:{guard.port}:{guard.port}"]
    # the classifier: the real demo upstream CLI, on the port the guard forwards to
    classifier = services["classifier"]
    assert classifier["entrypoint"] == ["python", "-m", "service.demo.upstream"]
    ran = upstream_cli(classifier["command"], monkeypatch)
    assert (ran["host"], ran["port"]) == ("0.0.0.0", 9001)
    assert classifier["expose"] == ["9001"]
    # health checks ask routes that exist
    assert "/readyz" in services["symguard"]["healthcheck"]["test"][-1]
    assert app_serves(ran["app"], "/healthz") and "/healthz" in classifier["healthcheck"]["test"][-1]
    assert not app_serves(ran["app"], "/no/such/route")


def test_compose_monitoring_wiring_matches_configs():
    services = compose()["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (sg_job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "symguard"]
    guard_port = services["symguard"]["command"][services["symguard"]["command"].index("--port") + 1]
    assert sg_job["static_configs"][0]["targets"] == [f"symguard:{guard_port}"]
    (am_target,) = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am_target.split(":")[0] in services and services["alertmanager"]["ports"] == ["127.0.0.1:9093:9093"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in services["alertmanager"]["command"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/symguard.yml").read_text())["providers"][0]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, str]:
    """stage name -> the text of that stage."""
    text = DOCKERFILE.read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2]))


def test_dockerfile_cpu_and_cuda_targets():
    stages = dockerfile_stages()
    assert {"wheel", "cpu", "cuda"} <= set(stages)
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", DOCKERFILE.read_text(), re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    assert "onnxruntime-gpu" in stages["cuda"] and "pip uninstall -y onnxruntime" in stages["cuda"]
    assert "CUDAExecutionProvider" in stages["cuda"]  # the build fails if the GPU build lacks CUDA
    assert "onnxruntime-gpu" not in stages["cpu"]
    cuda_base = re.search(r"^ARG CUDA_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert cuda_base.startswith("nvidia/cuda:") and "cudnn-runtime" in cuda_base
    for stage in ("cpu", "cuda"):
        assert 'ENTRYPOINT ["symguard"]' in stages[stage] and "USER 10001" in stages[stage]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    for needed in ("service", "models", "pyproject.toml"):  # what the wheel stage copies is not ignored
        assert needed not in ignored


# ---------------------------------------------------------------- Kubernetes

API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
}


def test_k8s_kinds_and_api_versions():
    docs = k8s_docs()
    assert set(docs) == {f"{k}/symguard" for k in API_VERSIONS}
    for key, doc in docs.items():
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], key
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "symguard", key
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization")


def test_k8s_selectors_ports_and_autoscaler_line_up():
    docs = k8s_docs()
    kinds = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    dep, svc, hpa, pdb = (docs[f"{k}/symguard"] for k in kinds)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selectors = [dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]]
    for selector in [*selectors, pdb["spec"]["selector"]["matchLabels"]]:
        assert selector.items() <= pod_labels.items()
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"symguard", "classifier"}
    port_names = {p["name"]: p["containerPort"] for p in containers["symguard"]["ports"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in port_names
    assert not containers["classifier"].get("ports"), "the classifier must only be reachable through the guard"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    for c in containers.values():  # CPU utilisation needs requests on every container; requests <= limits
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), (c["name"], kind)
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_names["http"]


def test_k8s_probes_are_real_routes_and_args_real_settings(monkeypatch):
    docs = k8s_docs()
    dep, cm = docs["Deployment/symguard"], docs["ConfigMap/symguard"]
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    sg = containers["symguard"]
    GuardSettings = guard_settings()
    for key in cm["data"]:
        setting_for_env(key, GuardSettings)
    assert [e["configMapRef"]["name"] for e in sg["envFrom"]] == [cm["metadata"]["name"]]
    settings = parse_symguard(sg["args"], monkeypatch, env=cm["data"])
    # env values arrived in the fields they name
    assert settings.upstream == cm["data"]["SYMGUARD_GUARD_UPSTREAM"] == "http://127.0.0.1:9001"
    assert settings.mode == cm["data"]["SYMGUARD_GUARD_MODE"]
    assert settings.intra_op_threads == int(cm["data"]["SYMGUARD_INTRA_OP_THREADS"])
    assert settings.inference_workers == int(cm["data"]["SYMGUARD_INFERENCE_WORKERS"])
    assert settings.inference_workers * settings.intra_op_threads <= quantity(sg["resources"]["limits"]["cpu"])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s
    port_names = {p["name"]: p["containerPort"] for p in sg["ports"]}
    assert settings.port == port_names["http"]

    from service.guard_app import create_guard_app

    apps = {"serve": create_app(Settings()), "guard": create_guard_app(settings)}
    for app in apps.values():
        assert not app_serves(app, "/no/such/route")  # the check can fail
    probes = {k: sg[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for name, probe in probes.items():
        for kind, app in apps.items():
            assert app_serves(app, probe["path"]), f"{name} asks {probe['path']}, not a route of the {kind} app"
        assert probe["port"] in port_names or probe["port"] == settings.port

    # the classifier: the real demo CLI, loopback only, on the port the guard forwards to
    cl = containers["classifier"]
    assert cl["command"] == ["python", "-m", "service.demo.upstream"]
    ran = upstream_cli(cl["args"], monkeypatch)
    assert ran["host"] == "127.0.0.1" and f"http://127.0.0.1:{ran['port']}" == settings.upstream
    assert app_serves(ran["app"], "/healthz")
    assert f"http://127.0.0.1:{ran['port']}/healthz" in cl["readinessProbe"]["exec"]["command"][-1]


# ---------------------------------------------------------------- metrics used by the dashboard and alerts


@pytest.fixture(scope="module")
def exported(mnist_digits) -> Iterator[tuple[set[str], str]]:
    """Metric names a live server exports after real traffic, plus the guard's families; and the raw text."""
    digits, _ = mnist_digits
    with LiveServer(model=MODEL) as server, server.client() as c:
        r = c.post("/v1/score", files=[("f", moved_png(d, k, False)) for d in digits[:8] for k in (0, 2)])
        assert r.status_code == 200
        text = c.get("/metrics").text
    from prometheus_client import generate_latest

    from service.metrics import GuardMetrics, Metrics

    m = Metrics()
    GuardMetrics(m, "canonicalize").upstream_duration.observe(0.01)
    guard_text = generate_latest(m.registry).decode()
    names = set()
    for line in (text + guard_text).splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    yield names | {"up"}, text


def referenced(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in re.findall(r"\b(symguard_[a-z0-9_]+|up)\b", e)}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "symguard"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("OOD rate by model", "group", "score", "angle", "latency", "Batch size", "provider"):
        assert needed.lower() in titles.lower(), needed
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    (ds_var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"


def test_dashboard_and_alerts_use_only_exported_metrics(exported):
    names, _ = exported
    for n in ("symguard_angle_degrees_bucket", "symguard_provider_fallback", "symguard_ood_score_bucket"):
        assert n in names
    alerts = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts.yml", alerts)):
        used = referenced(exprs)
        assert used, source
        assert used <= names, f"{source} uses metrics nobody exports: {sorted(used - names)}"


def test_live_exposition_passes_promtool_lint(exported):
    _, text = exported
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'symguard_provider_fallback{model="%s"} 0.0' % MODEL in text  # CPU-only build: nothing fell back


def test_provider_fallback_gauge(monkeypatch):
    """1 exactly when this ORT build offers CUDA and the session's real provider is not CUDA."""
    from service import runtime
    from service.metrics import Metrics

    def gauge(available: list[str], provider: str) -> float:
        monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: available)
        m = Metrics()
        m.model_loaded("m", 1, provider, {}, None)
        return m.registry.get_sample_value("symguard_provider_fallback", {"model": "m"})

    assert gauge(["CUDAExecutionProvider", "CPUExecutionProvider"], "CPUExecutionProvider") == 1
    assert gauge(["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider") == 0
    assert gauge(["CPUExecutionProvider"], "CPUExecutionProvider") == 0
    assert gauge(["AzureExecutionProvider", "CPUExecutionProvider"], "CPUExecutionProvider") == 0
