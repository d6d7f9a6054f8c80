"""One model, one request at a time: a FIFO queue in front of a single worker thread.

The event loop never runs the model. A request becomes a `Job`; `Scheduler.submit` queues it or
refuses it (503 with Retry-After when the queue is full, while the model loads, or while the
server shuts down). The worker thread takes jobs in order and runs each through `run(job)`;
what a job produces (`started`, `step`, `delta`, `canvas`, `done`, `error` items) goes back to the
event loop through `loop.call_soon_threadsafe`, where the request handler awaits it.

Cancelling: `Job.cancel()` (a client that went away) sets a flag the worker checks after every
denoising step, so generation stops within one step; a job still waiting is skipped. Step items are
coalesced: a client that reads slower than the model steps gets the latest draft canvas, never a
growing backlog; text items are never dropped.

Shutting down (`drain`): new jobs are refused, queued ones get a 503, the running one finishes.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

from ..errors import InputError
from .protocol import ApiError, new_id


class Job:
    """A request's generation, seen from both threads."""

    alive: "weakref.WeakSet[Job]" = weakref.WeakSet()    # every Job not yet freed (a leak check)

    def __init__(self, work: Any, loop: asyncio.AbstractEventLoop, kind: str = "chatcmpl"):
        Job.alive.add(self)
        self.id = new_id(kind)
        self.work = work
        self.loop = loop
        self._items: deque[tuple[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.steps = 0                  # denoising steps run for this job
        self.tokens = 0                 # tokens emitted
        self.steps_at_cancel: int | None = None
        self.finished = False           # done or error delivered

    # ---- worker side --------------------------------------------------------------------------
    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._push, kind, payload)
        except RuntimeError:           # the event loop is gone (server stopped): nobody listens
            pass

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ---- event-loop side ----------------------------------------------------------------------
    def _push(self, kind: str, payload: Any) -> None:
        if kind == "step" and self._items and self._items[-1][0] == "step":
            self._items[-1] = (kind, payload)          # the newest draft replaces an unread one
        else:
            self._items.append((kind, payload))
        self._wake.set()

    async def get(self) -> tuple[str, Any]:
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if item[0] in ("done", "error"):
            self.finished = True
        return item

    def cancel(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self.steps_at_cancel = self.steps
            self._cancel.set()


class Scheduler:
    """The FIFO queue and its worker thread. `run(job)` does the work (set once the model is
    loaded: until then every submit is refused as llama-server does while loading)."""

    def __init__(self, max_queue: int, log: Callable[[str], None] = lambda m: None):
        self.max_queue = max_queue
        self.log = log
        self.run: Callable[[Job], None] | None = None
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._draining = False
        self._closed = False
        self._mean_s = 1.0               # running mean of a job's wall time, for Retry-After
        self.counts = {"ok": 0, "cancelled": 0, "refused": 0, "error": 0}
        self.steps_total = 0
        self.tokens_total = 0
        self._thread = threading.Thread(target=self._work, name="diffcli-worker", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.run is not None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._draining:
                self.counts["refused"] += 1
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.run is None:
                self.counts["refused"] += 1
                raise ApiError(503, "Loading model", code="loading",
                               headers={"Retry-After": "1"})
            if len(self._waiting) >= self.max_queue:
                self.counts["refused"] += 1
                wait = math.ceil((len(self._waiting) + 1) * self._mean_s)
                raise ApiError(503, f"the queue is full ({self.max_queue} requests waiting); "
                                    f"retry in about {wait} s", code="queue_full",
                               headers={"Retry-After": str(max(1, wait))})
            self._waiting.append(job)
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": int(self._running is not None),
                    "jobs_alive": len(Job.alive),
                    "requests": dict(self.counts), "steps_total": self.steps_total,
                    "tokens_total": self.tokens_total}

    def drain(self) -> None:
        """Refuse new jobs and the queued ones; the running job goes on."""
        with self._cond:
            self._draining = True
            waiting, self._waiting = list(self._waiting), deque()
            self.counts["refused"] += len(waiting)
        for job in waiting:
            job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))

    def close(self, timeout: float | None = None) -> None:
        self.drain()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = None                       # hold no finished job while waiting for the next
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
                job = self._waiting.popleft()
                if job.cancelled:            # its client left while it waited
                    self.counts["cancelled"] += 1
                    continue
                self._running = job
            self._run_one(job)

    def _run_one(self, job: Job) -> None:
        job.t_start = time.perf_counter()
        outcome = "error"
        try:
            job.emit("started")
            outcome = self.run(job)
        except ApiError as exc:
            job.emit("error", exc)
        except InputError as exc:                # what the request asked for cannot be done
            job.emit("error", ApiError(400, exc.message))
        except Exception as exc:                # a bug or an environment problem: this job only
            self.log(f"diffcli serve: error in {job.id}: {type(exc).__name__}: {exc}")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            elapsed = time.perf_counter() - job.t_start
            with self._cond:
                self._running = None
                self.counts[outcome] = self.counts.get(outcome, 0) + 1
                self.steps_total += job.steps
                self.tokens_total += job.tokens
                self._mean_s = 0.8 * self._mean_s + 0.2 * elapsed
