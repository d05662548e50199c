"""`symguard eval-guard`: does the guard help a real classifier? Accuracy of the demo classifier on test digits,
sent straight to it and through `symguard guard`, with every piece a real process talking HTTP on 127.0.0.1.

Processes started (and stopped again):
  upstream     python -m service.demo.upstream          the demo CNN (service/demo/classifier.onnx), trained upright
  canonicalize symguard guard --mode canonicalize       de-rotates and de-mirrors each image, then forwards it
  gate         symguard guard --mode gate               forwards in-distribution images, answers OOD ones with a 422

Images: n test digits (models.datasets test split: never trained on, neither by the classifier nor by a bundle),
the same digits in every row, each 28x28 digit posed about its own centre with models.datasets.apply_pose (the
training code's rotation), rounded to 8 bits and sent as a PNG raw body to POST /predict. Rows:
  upright           the reference
  rotated ±180°     angle ~ U(-180°, 180°)
  rotated ±45°      angle ~ U(-45°, 45°)
  mirrored          left-right mirror, no rotation

`--via serve` measures the same two modes without the guard, from the client side: `symguard serve`'s
/v1/canonicalize then the upstream, and /v1/score's verdict as the gate. It should agree with `--via guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from models.datasets import apply_pose
from models.demo_classifier import upright_digits
from service.demo import DEMO_DIR
from service.geometry import canonicalize
from service.repository import DEFAULT_MODEL, default_repository

PREFERRED_MODEL = "mnist"  # a bundle trained on upright digits: the spec that matches the demo classifier's data
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0

Via = Literal["guard", "serve"]


@dataclass(frozen=True)
class Transform:
    name: str
    max_angle_deg: float  # angle ~ U(-max, max)
    mirrored: bool


TRANSFORMS = (
    Transform("upright", 0.0, False),
    Transform("rotated ±180°", 180.0, False),
    Transform("rotated ±45°", 45.0, False),
    Transform("mirrored", 0.0, True),
)


class Row(BaseModel):
    transform: str
    n: int
    direct_accuracy: float
    oracle_accuracy: float  # turned back with the true pose, then sent direct: the ceiling for canonicalize
    canonicalize_accuracy: float
    gate_rejected: float  # fraction of images the gate answered with a rejection
    gate_forwarded_accuracy: float | None  # accuracy on the images it let through; None if it let none through
    errors: int  # responses that were neither a prediction nor a gate rejection (should be 0)


class GuardEvalReport(BaseModel):
    model: str  # NAME:VERSION as the guard reported it (X-Symguard-* headers), else as requested
    repository: str
    via: Via
    n: int
    seed: int
    classifier_sha256: str
    classifier_upright_test_accuracy: float  # from classifier.json: all test digits, in process
    rows: list[Row]

    def table(self) -> str:
        pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        how = "symguard guard" if self.via == "guard" else "symguard serve (/v1/canonicalize, /v1/score verdict)"
        lines = [
            f"Demo classifier (sha256 {self.classifier_sha256[:12]}…, upright test accuracy "
            f"{pct(self.classifier_upright_test_accuracy)}) behind {how}, bundle `{self.model}`; "
            f"{self.n} test digits per row, seed {self.seed}.",
            "",
            "| test digits | direct | true pose undone | canonicalize | gate: rejected | gate: accuracy of forwarded |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.transform} | {pct(r.direct_accuracy)} | {pct(r.oracle_accuracy)} | {pct(r.canonicalize_accuracy)} | "
                f"{pct(r.gate_rejected)} | {pct(r.gate_forwarded_accuracy)} |"
            )
        errors = sum(r.errors for r in self.rows)
        if errors:
            lines += ["", f"{errors} responses were neither a prediction nor a gate rejection (counted as wrong)."]
        return "\n".join(lines)


# ---------------------------------------------------------------- images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def posed_pngs(n: int, seed: int) -> tuple[np.ndarray, dict[str, list[bytes]], dict[str, list[bytes]]]:
    """(labels, posed, oracle) for n test digits, the same digits in every row: PNG bytes per transform name.

    `oracle` is each posed image turned back with its true pose by service.geometry.canonicalize (what the guard
    does with a predicted pose): the ceiling for canonicalize mode, and a check that both rotation codes agree.
    """
    _, _, (x, y) = upright_digits()
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(rng.choice(len(x), size=min(n, len(x)), replace=False))
    x, y = x[idx], y[idx]
    gen = torch.Generator().manual_seed(seed)
    posed: dict[str, list[bytes]] = {}
    oracle: dict[str, list[bytes]] = {}
    for t in TRANSFORMS:
        angle = (torch.rand(len(x), generator=gen) * 2 - 1) * t.max_angle_deg
        moved = apply_pose(x, angle, torch.full((len(x),), t.mirrored))
        pixels = (moved[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        images = [Image.fromarray(arr) for arr in pixels]
        posed[t.name] = [_png(im) for im in images]
        oracle[t.name] = [_png(canonicalize(im, float(a), t.mirrored)) for im, a in zip(images, angle.tolist())]
    return y.numpy(), posed, oracle


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log: tempfile._TemporaryFileWrapper[bytes]

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]


def start(name: str, args: list[str], port: int, env: dict[str, str]) -> Proc:
    log = tempfile.NamedTemporaryFile(prefix=f"symguard-eval-{name}-", suffix=".log")
    popen = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return Proc(name, f"http://127.0.0.1:{port}", popen, log)


def wait_ready(procs: list[Proc], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until each answers 200 on /readyz (symguard: model loaded and self-checked) or, lacking one, /healthz."""
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    with httpx.Client(timeout=5) as client:
        while pending:
            for p in list(pending):
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")
                for path in ("/readyz", "/healthz"):
                    try:
                        r = client.get(p.url + path)
                    except httpx.TransportError:
                        break  # not listening yet
                    if r.status_code != 404:
                        if r.status_code == 200:
                            pending.remove(p)
                        break
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{pending[0].name} not ready after {timeout_s:.0f}s:\n{pending[0].log_tail()}")
            time.sleep(0.2)


@contextlib.contextmanager
def running(specs: list[tuple[str, list[str], int]], env: dict[str, str]) -> Iterator[dict[str, Proc]]:
    """Start every (name, args, port) at once (their startups overlap), wait until all are ready, stop them after."""
    procs: list[Proc] = []
    try:
        for name, args, port in specs:
            procs.append(start(name, args, port, env))
        wait_ready(procs)
        yield {p.name: p for p in procs}
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in procs:
            try:
                p.popen.wait(15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
            p.log.close()


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Outcome:
    predicted: str | None  # the upstream's class, if the image reached it
    rejected: bool = False  # the gate said no
    model: str | None = None  # NAME:VERSION the guard stamped on the forwarded request


PNG = {"content-type": "image/png"}


def _prediction(r: httpx.Response) -> Outcome:
    if r.status_code != 200:
        return Outcome(None)
    body = r.json()
    seen = {k.lower(): v for k, v in body.get("headers_seen", {}).items()}
    model = seen.get("x-symguard-model")
    version = seen.get("x-symguard-version")
    return Outcome(body.get("class"), model=f"{model}:{version}" if model and version else model)


def _is_rejection(r: httpx.Response) -> bool:
    """The gate's refusal: 422 {"code": "ood_input", ...}. Any other 4xx (a bad image, say) is an error, not a reject."""
    if r.status_code != 422 or "json" not in r.headers.get("content-type", ""):
        return False
    body = r.json()
    return isinstance(body, dict) and body.get("code") == "ood_input"


Send = Callable[[httpx.AsyncClient, bytes], Awaitable[Outcome]]


def via_guard(url: str) -> Send:
    async def send(client: httpx.AsyncClient, png: bytes) -> Outcome:
        r = await client.post(f"{url}/predict", content=png, headers=PNG)
        return Outcome(None, rejected=True) if _is_rejection(r) else _prediction(r)

    return send


def direct(upstream: str) -> Send:
    async def send(client: httpx.AsyncClient, png: bytes) -> Outcome:
        return _prediction(await client.post(f"{upstream}/predict", content=png, headers=PNG))

    return send


def serve_canonicalize(serve: str, upstream: str, model: str) -> Send:
    async def send(client: httpx.AsyncClient, png: bytes) -> Outcome:
        r = await client.post(f"{serve}/v1/canonicalize", params={"model": model}, content=png, headers=PNG)
        if r.status_code != 200:
            return Outcome(None)
        out = _prediction(await client.post(f"{upstream}/predict", content=r.content, headers=PNG))
        used = f"{r.headers.get('x-symguard-model')}:{r.headers.get('x-symguard-version')}"
        return Outcome(out.predicted, model=used)

    return send


def serve_gate(serve: str, upstream: str, model: str) -> Send:
    async def send(client: httpx.AsyncClient, png: bytes) -> Outcome:
        r = await client.post(f"{serve}/v1/score", params={"model": model}, content=png, headers=PNG)
        if r.status_code != 200:
            return Outcome(None)
        row = r.json()["results"][0]
        if row["verdict"] == "ood":
            return Outcome(None, rejected=True)
        out = _prediction(await client.post(f"{upstream}/predict", content=png, headers=PNG))
        return Outcome(out.predicted, model=f"{row['model']}:{row['version']}")

    return send


async def send_all(send: Send, pngs: list[bytes], concurrency: int) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one(png: bytes) -> Outcome:
            async with sem:
                return await send(client, png)

        return list(await asyncio.gather(*(one(p) for p in pngs)))


# ---------------------------------------------------------------- the evaluation


def choose_model(repository: Path) -> str:
    """`mnist` (trained on upright digits, like the classifier) if the repository has it, else the shipped default,
    else the first model there."""
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and any(v.name.isdigit() for v in p.iterdir()))
    for name in (PREFERRED_MODEL, DEFAULT_MODEL):
        if name in names:
            return name
    if not names:
        raise FileNotFoundError(f"no bundles under {repository}")
    return names[0]


def row_of(
    transform: str, labels: np.ndarray, direct_: list[Outcome], oracle: list[Outcome], canon: list[Outcome], gate: list[Outcome]
) -> Row:
    truth = [str(c) for c in labels.tolist()]
    acc = lambda outs: float(np.mean([o.predicted == t for o, t in zip(outs, truth)]))  # noqa: E731
    passed = [(o, t) for o, t in zip(gate, truth) if not o.rejected]
    errors = sum(o.predicted is None and not o.rejected for o in [*direct_, *oracle, *canon, *gate])
    return Row(
        transform=transform,
        n=len(truth),
        direct_accuracy=acc(direct_),
        oracle_accuracy=acc(oracle),
        canonicalize_accuracy=acc(canon),
        gate_rejected=1.0 - len(passed) / len(truth),
        gate_forwarded_accuracy=float(np.mean([o.predicted == t for o, t in passed])) if passed else None,
        errors=errors,
    )


def evaluate(
    model: str | None = None,
    repository: Path | None = None,
    n: int = 500,
    seed: int = 0,
    via: Via = "guard",
    concurrency: int = 8,
) -> GuardEvalReport:
    repository = (repository or default_repository()).resolve()
    model = model or choose_model(repository)
    labels, pngs, oracle_pngs = posed_pngs(n, seed)

    env = dict(os.environ)
    env["SYMGUARD_REPOSITORY"] = str(repository)
    # Small machines: one intra-op thread per process avoids oversubscription (several processes share the cores).
    env.setdefault("SYMGUARD_INTRA_OP_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    up, a, b = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up}"
    specs: list[tuple[str, list[str], int]] = [("upstream", ["-m", "service.demo.upstream", "--port", str(up)], up)]
    if via == "guard":
        for name, port in (("canonicalize", a), ("gate", b)):
            args = ["guard", "--upstream", upstream_url, "--mode", name, "--port", str(port), "--model", model,
                    # A request the guard could not score must not slip through unguarded and count as guarded:
                    # fail closed (a 503, counted as an error) and allow slow scoring on a busy machine.
                    "--on-failure", "fail_closed", "--score-timeout-s", "30"]  # fmt: skip
            specs.append((name, ["-m", "service.cli", *args], port))
    else:
        specs.append(("serve", ["-m", "service.cli", "serve", "--port", str(a), "--model", model], a))

    rows: list[Row] = []
    used: set[str] = set()
    with running(specs, env) as procs:
        if via == "guard":
            canon, gate = via_guard(procs["canonicalize"].url), via_guard(procs["gate"].url)
        else:
            canon = serve_canonicalize(procs["serve"].url, upstream_url, model)
            gate = serve_gate(procs["serve"].url, upstream_url, model)
        to_upstream = direct(upstream_url)
        for t in TRANSFORMS:
            runs = ((to_upstream, pngs), (to_upstream, oracle_pngs), (canon, pngs), (gate, pngs))
            outs = [asyncio.run(send_all(send, images[t.name], concurrency)) for send, images in runs]
            used |= {o.model for o in outs[2] + outs[3] if o.model}
            rows.append(row_of(t.name, labels, *outs))

    meta = json.loads((DEMO_DIR / "classifier.json").read_text())
    return GuardEvalReport(
        model=", ".join(sorted(used)) or model,
        repository=str(repository),
        via=via,
        n=len(labels),
        seed=seed,
        classifier_sha256=meta["sha256"],
        classifier_upright_test_accuracy=meta["test_accuracy"],
        rows=rows,
    )
