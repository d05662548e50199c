"""Micro-batching: one worker per served model turns many small requests into one session.run.

The worker takes the first waiting request, then keeps taking more until it holds max_batch images or max_delay
has passed (or no other request is in progress, so none can come: a lone request does not wait), runs them as ONE
batch on its own thread (never on the event loop), and hands each caller its rows.
The queue is bounded: a full queue is a 503 with Retry-After, not unbounded memory and latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import QueueFull, ShuttingDown, SymguardError
from service.metrics import MAX_GROUP_LABELS, Metrics
from service.middleware import InFlight
from service.runtime import ModelRuntime
from service.scoring import GraphOutputs, ImageScore

log = logging.getLogger("symguard.batching")


class InferenceFailed(SymguardError):
    status, code = 500, "inference_failed"


@dataclass
class Result:
    outputs: GraphOutputs
    rows: list[ImageScore]
    runtime: ModelRuntime  # the model version that produced them


@dataclass
class _Job:
    x: np.ndarray  # [n, C, S, S] float32, normalised
    future: asyncio.Future[Result]


_STOP = object()


class Batcher:
    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: Metrics,
        max_batch: int,
        max_delay_ms: float,
        queue_size: int,
        in_flight: InFlight | None = None,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.in_flight = in_flight  # None: always wait max_delay for more
        self.queue: asyncio.Queue[_Job | object] = asyncio.Queue(queue_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{runtime.name}-{runtime.version}")
        self._groups = {g.name for g in runtime.manifest.calibration.groups[:MAX_GROUP_LABELS]}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.runtime.name}")
        self._task.add_done_callback(self._log_death)

    def _log_death(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "batching worker for %s:%s died", self.runtime.name, self.runtime.version, exc_info=task.exception()
            )

    async def submit(self, x: np.ndarray) -> Result:
        """Queue x for the next batch and wait for its own rows. Cancelling the wait drops the job."""
        if self._task is not None and self._task.done() and not self._closing:  # a bug, not a state: say so, don't hang
            raise InferenceFailed(f"the batching worker of {self.runtime.name}:{self.runtime.version} has stopped")
        if self._closing:
            raise ShuttingDown(
                f"model {self.runtime.name}:{self.runtime.version} is being replaced or shut down; retry"
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(x, future))
        except asyncio.QueueFull:
            raise QueueFull(
                f"model {self.runtime.name} has {self.queue.maxsize} requests waiting; retry shortly"
            ) from None
        self._depth()
        return await future

    async def close(self) -> None:
        """Finish everything already queued, then stop the worker."""
        self._closing = True
        await self.queue.put(_STOP)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # ---- the worker

    def _depth(self) -> None:
        self.metrics.queue_depth.labels(self.runtime.name).set(self.queue.qsize())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None  # a job that did not fit in the previous batch
        stopping = False
        while not stopping or carry is not None:
            first = carry if carry is not None else await self.queue.get()
            carry = None
            if first is _STOP:
                break
            jobs: list[_Job] = [first]  # type: ignore[list-item]
            n = len(first.x)  # type: ignore[union-attr]
            deadline = loop.time() + self.max_delay
            while n < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._none_coming(len(jobs)):
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                if nxt is _STOP:
                    stopping = True
                    break
                if n + len(nxt.x) > self.max_batch:  # type: ignore[union-attr]
                    carry = nxt  # type: ignore[assignment]
                    break
                jobs.append(nxt)  # type: ignore[arg-type]
                n += len(nxt.x)  # type: ignore[union-attr]
            self._depth()
            await self._run(loop, [j for j in jobs if not j.future.done()])  # callers that gave up are skipped
        self._depth()

    def _none_coming(self, collected: int) -> bool:
        """True when every request in progress is already in this batch: waiting could only add latency. (With
        several models, or a guard's forwarded requests, the count over-estimates, and the batch waits as before.)"""
        return self.in_flight is not None and self.in_flight.count <= collected

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        if not jobs:
            return
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        try:
            result = await loop.run_in_executor(self._executor, self._infer, x)
        except Exception as e:  # the worker must outlive any one bad batch
            log.exception(
                "inference failed for a batch of %d on %s:%s", len(x), self.runtime.name, self.runtime.version
            )
            err = InferenceFailed(f"inference failed: {type(e).__name__}: {e}")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        start = 0
        for j in jobs:
            stop = start + len(j.x)
            if not j.future.done():
                j.future.set_result(Result(result.outputs.rows(start, stop), result.rows[start:stop], self.runtime))
            start = stop

    def _infer(self, x: np.ndarray) -> Result:
        """On the worker thread: one session.run, scoring, and per-image metrics."""
        t0 = time.perf_counter()
        outputs, rows = self.runtime.score(x)
        name = self.runtime.name
        self.metrics.inference_duration.labels(name).observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels(name).observe(len(x))
        self.metrics.record_rows(rows, self._groups)
        return Result(outputs, rows, self.runtime)
