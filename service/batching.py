"""Micro-batching: one batcher per served model turns many small requests into few session.run calls.

The batcher waits for a free inference worker, then takes the first waiting request and keeps taking more until
it holds max_batch images or max_delay has passed (or no other request is in progress, so none can come: a lone
request does not wait). It runs the batch on a worker thread (never on the event loop) and hands each caller its
rows. With several workers, several batches run at once; a batch that finds other workers idle and nothing else
waiting is split across them, so a lone request still uses every core. The queue is bounded: a full queue is a 503
with Retry-After, not unbounded memory and latency.
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
        workers: int = 1,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.in_flight = in_flight  # None: always wait max_delay for more
        self.workers = workers
        self.queue: asyncio.Queue[_Job | object] = asyncio.Queue(queue_size)
        self._free = asyncio.Semaphore(workers)  # idle worker threads
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{runtime.name}-{runtime.version}")
        self._groups = {g.name for g in runtime.manifest.calibration.groups[:MAX_GROUP_LABELS]}
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # batches running now
        self._jobs_running = 0  # requests in those batches
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
            # A worker first, then the batch: requests arriving while every worker is busy wait in the queue and
            # join this batch, instead of each starting a small batch of its own.
            await self._free.acquire()
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
            live = [j for j in jobs if not j.future.done()]  # callers that gave up are skipped
            if not live:
                self._free.release()
                continue
            batch = loop.create_task(self._run(loop, live))
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
        if self._batches:
            await asyncio.wait(list(self._batches))
        self._depth()

    def _none_coming(self, collected: int) -> bool:
        """True when every request in progress is already in a batch: waiting could only add latency. (With
        several models, or a guard's forwarded requests, the count over-estimates, and the batch waits as before.)"""
        return self.in_flight is not None and self.in_flight.count <= collected + self._jobs_running

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        """Run one batch on the worker already taken for it (plus any idle ones it can split across), then answer."""
        parts = 1  # workers held: the one taken for this batch, then any idle one it splits across
        self._jobs_running += len(jobs)
        failed: BaseException | None = None
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
            if self.queue.empty():  # nothing else to run: idle workers take a share of this batch
                while parts < min(self.workers, len(x)) and not self._free.locked():
                    await self._free.acquire()  # immediate: the semaphore is not locked
                    parts += 1
            done = await asyncio.gather(
                *(loop.run_in_executor(self._executor, self._infer, chunk) for chunk in np.array_split(x, parts)),
                return_exceptions=True,  # every part finishes before its worker is counted idle again
            )
            failed = next((e for e in done if isinstance(e, BaseException)), None)
        except Exception as e:
            failed = e
        finally:
            self._jobs_running -= len(jobs)
            for _ in range(parts):
                self._free.release()
        if failed is not None:  # the batcher must outlive any one bad batch
            log.error(
                "inference failed for a batch of %d request(s) on %s:%s", len(jobs), self.runtime.name,
                self.runtime.version, exc_info=failed,
            )  # fmt: skip
            err = InferenceFailed(f"inference failed: {type(failed).__name__}: {failed}")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        results: list[Result] = done  # type: ignore[assignment]
        outputs = results[0].outputs if parts == 1 else GraphOutputs.concat([r.outputs for r in results])
        rows = [row for r in results for row in r.rows]
        start = 0
        for j in jobs:
            stop = start + len(j.x)
            if not j.future.done():
                j.future.set_result(Result(outputs.rows(start, stop), rows[start:stop], self.runtime))
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
