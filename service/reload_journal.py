"""A reload that reaches every server process (`--processes N`).

The process that answers POST /v1/models/NAME/reload loads the new version itself, as a single process does. Then
it writes the version to the journal: one small JSON file per model in the folder the processes share, replaced
atomically. Every process polls the journal, loads what it names and writes an acknowledgement, which the
answering process collects (bounded) for its response. A process that starts later (one that replaced a dead
worker) loads the journal's versions rather than the newest, so it serves what its siblings serve.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.25  # how often a process looks for a sibling's reload: a 0.25 s lag, a directory read per poll


@dataclass(frozen=True)
class Entry:
    seq: str  # unique per publish: "time_ns-pid"
    version: int


@dataclass(frozen=True)
class Ack:
    pid: int
    version: int | None  # what the process serves after trying; None when it never answered
    error: str | None


def _write_atomic(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _read(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ReloadJournal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pid = os.getpid()
        for sub in ("entries", "acks", "processes"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.applied: dict[str, str] = {}  # model -> seq of the last entry this process acted on

    # ---- processes

    def register(self, ready: bool) -> None:
        _write_atomic(self.folder / "processes" / str(self.pid), {"ready": ready})

    def unregister(self) -> None:
        (self.folder / "processes" / str(self.pid)).unlink(missing_ok=True)

    def processes(self) -> list[int]:
        """Registered processes still alive (a killed worker's file stays behind; its pid is gone)."""
        pids = [int(p.name) for p in (self.folder / "processes").iterdir() if p.name.isdigit()]
        return sorted(pid for pid in pids if pid_alive(pid))

    def readiness(self) -> dict[int, bool]:
        """Live registered processes -> whether each says it is ready."""
        out = {}
        for pid in self.processes():
            data = _read(self.folder / "processes" / str(pid))
            out[pid] = bool(data and data.get("ready"))
        return out

    # ---- entries

    def entries(self) -> dict[str, Entry]:
        out = {}
        for path in (self.folder / "entries").glob("*.json"):
            data = _read(path)
            if data is not None:
                out[path.stem] = Entry(str(data["seq"]), int(data["version"]))  # type: ignore[call-overload]
        return out

    def publish(self, name: str, version: int) -> str:
        """Record that NAME should serve VERSION everywhere; this process already does."""
        seq = f"{time.time_ns()}-{self.pid}"
        self.applied[name] = seq
        _write_atomic(self.folder / "entries" / f"{name}.json", {"seq": seq, "version": version})
        self.ack(name, seq, version, None)
        return seq

    def pending(self) -> dict[str, Entry]:
        """Entries this process has not acted on yet."""
        return {name: e for name, e in self.entries().items() if self.applied.get(name) != e.seq}

    # ---- acknowledgements

    def ack(self, name: str, seq: str, version: int | None, error: str | None) -> None:
        self.applied[name] = seq
        path = self.folder / "acks" / f"{name}.{self.pid}.json"
        _write_atomic(path, {"seq": seq, "version": version, "error": error})

    def acks(self, name: str, seq: str) -> dict[int, Ack]:
        out = {}
        for path in (self.folder / "acks").glob(f"{name}.*.json"):
            pid_text = path.stem.rsplit(".", 1)[-1]
            data = _read(path)
            if pid_text.isdigit() and data is not None and data.get("seq") == seq:
                version = data.get("version")
                error = data.get("error")
                out[int(pid_text)] = Ack(
                    int(pid_text), version if isinstance(version, int) else None, str(error) if error else None
                )
        return out

    async def gather(self, name: str, seq: str, timeout_s: float) -> list[Ack]:
        """Every live process's answer to entry `seq`, waiting up to timeout_s for the slow ones."""
        deadline = time.monotonic() + timeout_s
        while True:
            acks = self.acks(name, seq)
            live = self.processes()
            if all(pid in acks for pid in live) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        late = f"no answer within {timeout_s:g}s"
        return [acks.get(pid, Ack(pid, None, late)) for pid in sorted(set(live) | set(acks))]
