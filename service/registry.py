"""The models being served, and atomic reloads.

A reload verifies, loads and self-checks the new version beside the old one; only then does one assignment swap
which version new requests see. The old version's batcher finishes what it already queued. A failed reload leaves
the old version serving, records why, and bumps symguard_reload_failures_total.

With several server processes (`--processes N`) each has its own registry; `reload` publishes to the shared
ReloadJournal and a follower task in every process applies what its siblings published (reload_journal.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from service import runtime
from service.batching import Batcher
from service.config import Settings
from service.errors import BundleError, CudaUnavailable, ModelNotFound, ModelNotReady
from service.manifest import is_safe_name
from service.metrics import Metrics
from service.middleware import InFlight
from service.reload_journal import POLL_S, Ack, ReloadJournal
from service.repository import DEFAULT_MODEL, ModelRef, Repository, default_repository
from service.runtime import ModelRuntime

log = logging.getLogger("symguard.registry")


@dataclass
class Served:
    runtime: ModelRuntime
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)


ACK_TIMEOUT_S = 60.0  # how long a reload waits for sibling processes to load the new version too


class Registry:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        in_flight: InFlight | None = None,
        journal: ReloadJournal | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.metrics = metrics
        self.in_flight = in_flight
        self.repository = Repository(settings.repository or default_repository())
        self.pin = ModelRef.parse(settings.model) if settings.model else None
        self.models: dict[str, Served] = {}
        self.unavailable: dict[
            str, str
        ] = {}  # models that should serve but could not load -> why (keeps /readyz at 503)
        self.last_error: dict[
            str, str
        ] = {}  # last failed load/reload per model, also when an older version still serves
        self._locks: dict[str, asyncio.Lock] = {}
        self._follower: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def start(self) -> None:
        names = [self.pin.name] if self.pin else self.repository.names()
        if not names:
            self.unavailable["*"] = f"no models in repository {self.repository.root}"
            log.warning("no models found in %s; /readyz stays 503 until one is loaded via reload", self.repository.root)
        published = self.journal.entries() if self.journal else {}
        if self.journal:
            self.journal.register(ready=False)  # siblings' /readyz say 503 until this process has loaded
            names += sorted(set(published) - set(names))  # a model the siblings loaded by reload
        for name in names:
            entry = published.get(name)
            try:
                await self.load(name, entry.version if entry else None)
            except CudaUnavailable:
                raise  # require_cuda: refusing to start is the point
            except BundleError as e:
                log.error("model %s not loaded: %s", name, e.message)
            except ModelNotFound as e:  # e.g. --model names a version that is not on disk
                self.unavailable[name] = e.message
                log.error("model %s not loaded: %s", name, e.message)
            if entry and self.journal:
                self.journal.applied[name] = entry.seq  # what the siblings serve, this process now serves (or tried)
        self._ready_changed()
        if self.journal:
            self._follower = asyncio.create_task(self._follow(self.journal), name="symguard-reload-follower")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self.journal:
            self.journal.unregister()
        served, self.models = list(self.models.values()), {}
        await asyncio.gather(*(s.batcher.close() for s in served))

    # ---- loading

    async def load(self, name: str, version: int | None = None) -> Served:
        """Load NAME (pinned version, the given one, or the newest), self-check it, then swap it in."""
        if not is_safe_name(name):  # before anything keyed by it: a name from a URL never reaches a path or a dict
            raise ModelNotFound(f"{name[:100]!r} is not a model name ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
        if self.pin and name != self.pin.name:
            raise ModelNotFound(f"this server is pinned to {self.pin}; {name!r} is not served")
        ref = ModelRef(name, version if version is not None else self.pin.version if self.pin else None)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one reload per model at a time
            try:
                bundle = await asyncio.to_thread(self.repository.open, ref)
                rt = await asyncio.to_thread(
                    runtime.load, bundle, self.settings.intra_op_threads, self.settings.require_cuda
                )
            except BundleError as e:
                self._failed(name, e.message)
                raise
            batcher = Batcher(
                rt, self.metrics, self.settings.max_batch, self.settings.max_delay_ms, self.settings.queue_size,
                self.in_flight, self.settings.workers,
            )  # fmt: skip
            batcher.start()
            old = self.models.get(name)
            self.models[name] = new = Served(rt, batcher)  # the swap: new requests see the new version from here on
            self.unavailable.pop(name, None)
            self.unavailable.pop("*", None)
            self.last_error.pop(name, None)
            assert rt.self_check is not None
            previous = (old.runtime.version, old.runtime.provider) if old else None
            self.metrics.model_loaded(name, rt.version, rt.provider, rt.self_check.equivariance_error, previous)
            self._ready_changed()
        if old is not None:
            await old.batcher.close()
            log.info("model %s: version %s replaced by %s", name, old.runtime.version, rt.version)
        return new

    async def reload(self, name: str, version: int | None = None) -> tuple[Served, list[Ack]]:
        """load(), then, with sibling processes, have every one of them load the same version; their answers."""
        served = await self.load(name, version)
        if self.journal is None:
            return served, []
        seq = self.journal.publish(name, served.runtime.version)
        return served, await self.journal.gather(name, seq, ACK_TIMEOUT_S)

    async def _follow(self, journal: ReloadJournal) -> None:
        """Apply what sibling processes published, one entry at a time, acknowledging each."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                pending = await asyncio.to_thread(journal.pending)
            except OSError as e:
                log.error("cannot read the reload journal in %s: %s", journal.folder, e)
                continue
            for name, entry in pending.items():
                try:
                    served = await self.load(name, entry.version)
                    journal.ack(name, entry.seq, served.runtime.version, None)
                    log.info("model %s: version %s loaded, as a sibling process published", name, entry.version)
                except (BundleError, ModelNotFound) as e:
                    current = self.models.get(name)
                    journal.ack(name, entry.seq, current.runtime.version if current else None, e.message)
                except Exception as e:  # keep following: one bad entry must not stop later reloads reaching us
                    log.exception("model %s: applying a sibling's reload failed", name)
                    journal.ack(name, entry.seq, None, f"{type(e).__name__}: {e}")

    def _ready_changed(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)
        if self.journal:
            self.journal.register(ready=self.ready)

    def _failed(self, name: str, why: str) -> None:
        self.last_error[name] = why
        if name not in self.models:
            self.unavailable[name] = why
        self.metrics.reload_failures.labels(name).inc()
        self._ready_changed()

    # ---- lookup

    @property
    def ready(self) -> bool:
        return bool(self.models) and not self.unavailable

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, problems) for /readyz: this process's, and with sibling processes, theirs too. A load balancer
        sends traffic to the port, not to one process, so one process that cannot serve makes the port unready."""
        problems = dict(self.unavailable)
        if self.journal:
            for pid, ok in self.journal.readiness().items():
                if not ok and pid != self.journal.pid:
                    problems[f"process {pid}"] = "a sibling server process is not ready (starting, or a model failed)"
        return self.ready and not problems, problems

    @property
    def default_name(self) -> str | None:
        if self.pin:
            return self.pin.name
        if DEFAULT_MODEL in self.models:
            return DEFAULT_MODEL
        return min(self.models, default=None)

    def get(self, ref: ModelRef | None = None) -> Served:
        name = ref.name if ref else self.default_name
        if name is None:
            raise ModelNotReady(
                "no model is loaded" + (f": {self.unavailable.get('*')}" if "*" in self.unavailable else "")
            )
        served = self.models.get(name)
        if served is None:
            if name in self.unavailable:
                raise ModelNotReady(f"model {name!r} is not loaded: {self.unavailable[name]}")
            raise ModelNotFound(f"model {name!r} is not served (served: {sorted(self.models) or 'none'})")
        if ref is not None and ref.version is not None and ref.version != served.runtime.version:
            raise ModelNotFound(
                f"model {name!r} version {ref.version} is not served (serving version {served.runtime.version})"
            )
        return served
