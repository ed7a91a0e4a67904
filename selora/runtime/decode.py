"""``FairDecoder``: the request-side work (image decoding and preprocessing, tokenizing, pinning)
on a few threads, shared fairly between requests.

Every call of ``run``/``map`` is one *flow* (a request) of jobs, each with a cost (pixels for an
image, 1 otherwise), and belongs to a *client* (the tenant the request comes from; a call without
one is a client of its own). Threads take the next job of the client with the least virtual
time, and within it of its flow with the least (start-time fair queueing on both levels: virtual
times grow by the cost of each job taken, and a new client or flow starts at the current virtual
time). So a client sending many large images, in one request or in many at once, gets one share
and no more: another client's request arriving behind them is served next, and the client's own
requests share its part. One thread is reserved for small jobs (cost ≤ ``small``), so a normal
request never waits for a large decode to finish, whoever sent that.
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
    client: Any
    vtime: float
    jobs: deque = field(default_factory=deque)  # (cost, fn, args, future, loop)


class FairDecoder:
    def __init__(self, threads: int = 2, reserved_small: int = 1, small: int = 1 << 20, name: str = "selora-decode"):
        self.small = small
        self._flows: dict[int, _Flow] = {}  # one per call
        self._clients: dict[Any, float] = {}  # virtual time of each client with queued jobs
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

    async def run(self, fn: Callable, *args, cost: int = 1, client: str | None = None) -> Any:
        """``fn(*args)`` as a flow of one job of ``client``."""
        return (await self.map(fn, [args], [cost], client))[0]

    async def map(self, fn: Callable, args_list: list[tuple], costs: list[int], client: str | None = None) -> list:
        """``[fn(*args) for args in args_list]`` as one flow of ``client`` (None: a client of its
        own); the first error is raised."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in args_list]
        with self._cond:
            if self._closed:
                raise RuntimeError("decoder is closed")
            flow_id = next(self._ids)
            who = ("call", flow_id) if client is None else ("client", client)
            flow = _Flow(who, self._clients.setdefault(who, self._vtime))
            flow.jobs.extend((c, fn, a, f, loop) for c, a, f in zip(costs, args_list, futures))
            self._flows[flow_id] = flow
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
        """The head job of the eligible flow of least (client, flow) virtual time (lock held)."""
        best_id, best, best_key = None, None, None
        for flow_id, flow in list(self._flows.items()):
            while flow.jobs and flow.jobs[0][3].cancelled():
                flow.jobs.popleft()
            if not flow.jobs:
                self._drop(flow_id)
                continue
            if small_only and flow.jobs[0][0] > self.small:
                continue
            key = (self._clients[flow.client], flow.vtime)
            if best is None or key < best_key:
                best_id, best, best_key = flow_id, flow, key
        if best is None:
            return None
        job = best.jobs.popleft()
        self._vtime = max(self._vtime, best_key[0])
        self._clients[best.client] += job[0]
        best.vtime += job[0]
        if not best.jobs:
            self._drop(best_id)
        return job

    def _drop(self, flow_id: int) -> None:
        """Forget an empty flow, and its client once it has no other."""
        client = self._flows.pop(flow_id).client
        if all(f.client != client for f in self._flows.values()):
            del self._clients[client]

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
