"""``FairDecoder``: the request-side work (image decoding and preprocessing, tokenizing, pinning)
on a few threads, shared fairly between requests.

Every call of ``run``/``map`` is one *flow* (a request) of jobs, each with a cost (pixels for an
image, 1 otherwise). Threads take the next job from the flow with the least virtual time
(start-time fair queueing: a flow's virtual time grows by the cost of each job it gets, and a
new flow starts at the current virtual time), so a request of many large images gets its share
and no more: a small request arriving behind it is served next. One thread is reserved for
small jobs (cost ≤ ``small``), so a normal request never waits for a large decode to finish.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Flow:
    vtime: float
    jobs: deque = field(default_factory=deque)  # (cost, fn, args, future, loop)


class FairDecoder:
    def __init__(self, threads: int = 2, reserved_small: int = 1, small: int = 1 << 20, name: str = "selora-decode"):
        self.small = small
        self._flows: dict[int, _Flow] = {}
        self._ids = itertools.count()
        self._vtime = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(i < reserved_small,), name=f"{name}-{i}", daemon=True)
            for i in range(max(threads, reserved_small + 1))
        ]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable, *args, cost: int = 1) -> Any:
        """``fn(*args)`` as a flow of one job."""
        return (await self.map(fn, [args], [cost]))[0]

    async def map(self, fn: Callable, args_list: list[tuple], costs: list[int]) -> list:
        """``[fn(*args) for args in args_list]`` as one flow; the first error is raised."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in args_list]
        with self._cond:
            if self._closed:
                raise RuntimeError("decoder is closed")
            flow = _Flow(self._vtime)
            flow.jobs.extend((c, fn, a, f, loop) for c, a, f in zip(costs, args_list, futures))
            self._flows[next(self._ids)] = flow
            self._cond.notify_all()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for f in futures:  # a failed or cancelled request drops its jobs not yet started
                f.cancel()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _next(self, small_only: bool):
        """The head job of the eligible flow with the least virtual time (lock held)."""
        best_id, best = None, None
        for flow_id, flow in list(self._flows.items()):
            while flow.jobs and flow.jobs[0][3].cancelled():
                flow.jobs.popleft()
            if not flow.jobs:
                del self._flows[flow_id]
                continue
            if small_only and flow.jobs[0][0] > self.small:
                continue
            if best is None or flow.vtime < best.vtime:
                best_id, best = flow_id, flow
        if best is None:
            return None
        job = best.jobs.popleft()
        self._vtime = max(self._vtime, best.vtime)
        best.vtime += job[0]
        if not best.jobs:
            del self._flows[best_id]
        return job

    def _work(self, small_only: bool) -> None:
        while True:
            with self._cond:
                while not self._closed and (job := self._next(small_only)) is None:
                    self._cond.wait()
                if self._closed:
                    return
            _, fn, args, future, loop = job
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the awaiting request
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
