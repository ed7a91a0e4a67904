"""The engine: a dynamic batcher in front of one forward thread.

Requests (any adapter, or the base; images or texts) are queued as jobs. The batching loop
takes queued jobs up to ``max_batch_size`` rows, waiting at most ``max_wait_ms`` after the
oldest job arrived for the batch to fill, and runs the batch on the single forward thread: per
modality and input size one forward (an adapter's images run at the size it was trained at, the
base's at the base's size), its rows grouped by adapter (``plan_rows``) and its per-layer
metadata built once (``build_batch``), through ``selora.runtime.batch.forward_mixed``.
Image decoding and preprocessing run on a ``FairDecoder`` (a few threads shared fairly between
requests, by decode cost), never on the event loop. The queue is bounded in rows: a request
that does not fit is refused with ``OverloadedError``. A job whose rows come out non-finite
fails alone with ``NonFiniteOutputError`` naming its adapter; the other jobs of its batch are
answered as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from selora.adapters.format import head_logits
from selora.adapters.inject import inject
from selora.models.factory import Backbone
from selora.models.prompts import zero_shot_weights
from selora.kernels.config import KernelConfig
from selora.runtime.batch import forward_mixed
from selora.runtime.decode import FairDecoder
from selora.runtime.graphs import CudaGraphs
from selora.runtime.inputs import InputError, Limits, open_images, preprocess_image, tokenize_texts
from selora.runtime.registry import AdapterRecord, AdapterRegistry, UnknownAdapterError
from selora.runtime.slots import DeviceAdapter

log = logging.getLogger(__name__)

BASE = "base"


class OverloadedError(RuntimeError):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(RuntimeError):
    """The engine is not running (starting up or shutting down)."""


class NoClassifierError(InputError):
    """Classification asked of a model that has neither labels to use nor a head."""


class NonFiniteOutputError(ValueError):
    """A forward under an adapter produced NaN or Inf; the message names the adapter."""


@dataclass
class Job:
    modality: str  # "image" | "text"
    record: AdapterRecord | None  # None: the base model
    inputs: torch.Tensor  # [n, ...] preprocessed pixels or tokens
    size: tuple[int, int] | None  # images: the input size they were preprocessed to
    future: asyncio.Future
    queued_at: float

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def shape_key(self) -> tuple:
        """Jobs with the same key run in one forward."""
        return (self.modality, self.size)


@dataclass
class Embeddings:
    vectors: torch.Tensor  # [n, embed_dim], float32
    tokens: int  # tokens processed: text tokens, or for images the image tokens at their size


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        registry: AdapterRegistry,
        limits: Limits = Limits(),
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 512,
        on_batch: Callable[[str, int], None] | None = None,
        config: KernelConfig | None = None,
        graphs: CudaGraphs | None = None,
    ):
        self.backbone, self.registry, self.limits = backbone, registry, limits
        self.config = config or KernelConfig.resolve(backbone.device)
        self.graphs = graphs  # captured forwards (--cuda-graphs), replayed for base-size batches they hold
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch or (lambda modality, rows: None)
        self.queued_rows = 0
        self._pending: deque[Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="selora-forward")
        self._decoder = FairDecoder(threads=2, reserved_small=1)
        self._zero_shot: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.created = int(time.time())
        self._running: list[Job] = []  # the batch in the forward thread now
        inject(backbone)

    # -- life ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.create_task(self._batch_loop(), name="selora-batcher")

    async def stop(self) -> None:
        """Finish the queued jobs, then stop the loop and the threads."""
        if self._loop_task is not None:
            while self._pending and self.running:
                await asyncio.sleep(0.01)
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._forward_pool.shutdown(wait=True)
        self._decoder.close()

    # -- public calls -------------------------------------------------------------------
    async def embed(self, model: str, modality: str, inputs: list, normalize: bool = False, client: str | None = None) -> Embeddings:
        """Embeddings of ``inputs`` under adapter ``model`` (or ``"base"``) and the tokens they took;
        ``client`` (the caller's tenant) is whose share of the decoder the request's work takes."""
        record = await self._pin(model, client)
        try:
            job = await self._job(modality, inputs, record, client)
            out = await self._run(job)
        finally:
            self._unpin(record)
        return Embeddings(F.normalize(out.float(), dim=-1) if normalize else out.float(), self._tokens(job))

    def knows(self, model: str) -> bool:
        """``model`` is the base or the address (``tenant/name``) of a registered adapter (as
        registered now: the store is not asked again)."""
        try:
            return model == BASE or self.registry.lookup(model) is not None
        except UnknownAdapterError:
            return False

    def requests_by_adapter(self) -> tuple[dict[str, int], dict[str, int]]:
        """(running, waiting) requests per model name (``base`` included), now."""
        def count(jobs) -> dict[str, int]:
            out: dict[str, int] = {}
            for job in jobs:
                name = BASE if job.record is None else job.record.address
                out[name] = out.get(name, 0) + 1
            return out

        return count(list(self._running)), count(list(self._pending))

    def input_size(self, record: AdapterRecord | None) -> tuple[int, int]:
        """The image size rows of ``record`` (None: the base) run at."""
        size = record.entry.info.get("input_size") if record is not None else None
        return tuple(size) if size else self.backbone.input_size

    async def classify(self, model: str, images: list, labels: list[str] | None, top_k: int,
                       client: str | None = None) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` (label, probability) pairs: zero-shot over ``labels`` with a
        CLIP base, else the adapter's own head."""
        if labels is not None and "text" not in self.backbone.modalities:
            raise NoClassifierError(f"zero-shot labels need a CLIP base; {self.backbone.model_id} has no text tower")
        if labels is not None and (not labels or len(labels) > self.limits.max_inputs or len(set(labels)) != len(labels)):
            raise InputError(f"labels must be 1 to {self.limits.max_inputs} distinct class names")
        record = await self._pin(model, client)
        try:
            job = await self._job("image", images, record, client)
            if labels is None:
                head = await self._head(record)
            emb = await self._run(job)
            if labels is None:
                weight, bias, classes, head_input = head
                logits = head_logits(weight, bias, emb, head_input)
            else:
                weights = await asyncio.get_running_loop().run_in_executor(self._forward_pool, self._zero_shot_weights, record, tuple(labels))
                scale = self.backbone.model.logit_scale.exp().float() if hasattr(self.backbone.model, "logit_scale") else 100.0
                logits, classes = scale * F.normalize(emb.float(), dim=-1) @ weights.t(), labels
            if not torch.isfinite(logits).all():
                raise _non_finite(record)
        finally:
            self._unpin(record)
        probs = logits.softmax(dim=-1)
        top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        return [[(classes[j], float(p)) for p, j in zip(ps.tolist(), js.tolist())] for ps, js in zip(top.values, top.indices)]

    # -- request side -------------------------------------------------------------------
    async def _job(self, modality: str, inputs: list, record: AdapterRecord | None, client: str | None) -> Job:
        """Inputs decoded on the fair decoder, off the event loop (images at the size of
        ``record``, their headers checked before any pixel is decoded), as a queued job."""
        if modality == "text":
            size = None
            tensors = await self._decoder.run(tokenize_texts, self.backbone, inputs, self.limits, client=client)
        elif modality == "image":
            size = self.input_size(record)
            images = await self._decoder.run(open_images, inputs, self.limits, client=client)  # headers only: costs bounded first
            transform = self.backbone.sizes.transform(size)
            pixels = await self._decoder.map(preprocess_image, [(transform, img) for img in images],
                                             [img.width * img.height for img in images], client)
            tensors = torch.stack(pixels).to(self.backbone.dtype)
        else:
            raise InputError(f"modality must be 'image' or 'text', got {modality!r}")
        return Job(modality, record, tensors, size, asyncio.get_running_loop().create_future(), time.monotonic())

    def _tokens(self, job: Job) -> int:
        if job.modality == "text":
            return int((job.inputs != 0).sum())  # open_clip pads with 0
        return job.rows * self.backbone.sizes.tokens(job.size)

    async def _pin(self, model: str, client: str | None = None) -> AdapterRecord | None:
        """The current record of ``model``, pinned (an unknown adapter is a 404 before any decoding)."""
        if model == BASE:
            return None
        return await self._decoder.run(self.registry.pin, model, client=client)

    def _unpin(self, record: AdapterRecord | None) -> None:
        if record is not None:
            self.registry.unpin(record)

    async def _head(self, record: AdapterRecord | None) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
        dev = None
        if record is not None:
            (dev,) = await asyncio.get_running_loop().run_in_executor(self._forward_pool, self.registry.device_adapters, [record])
        if dev is None or dev.head is None:
            what = "the base model" if record is None else f"adapter {record.name!r}"
            raise NoClassifierError(f"{what} has no classification head: pass labels (zero-shot, CLIP bases only)")
        return (*dev.head, dev.head_classes, dev.head_input)

    async def _run(self, job: Job) -> torch.Tensor:
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        if self.queued_rows + job.rows > self.max_queue:
            raise OverloadedError(f"queue full ({self.queued_rows} rows waiting, limit {self.max_queue})")
        self._pending.append(job)
        self.queued_rows += job.rows
        self._wakeup.set()
        return await job.future

    # -- batching loop ------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].queued_at + self.max_wait
            while self.queued_rows < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            jobs, rows = [], 0
            while self._pending and (not jobs or rows + self._pending[0].rows <= self.max_batch_size):
                job = self._pending.popleft()
                jobs.append(job)
                rows += job.rows
            self.queued_rows -= rows
            self._running = jobs
            try:
                results = await loop.run_in_executor(self._forward_pool, self._forward_jobs, jobs)
            finally:
                self._running = []
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _forward_jobs(self, jobs: list[Job]) -> list[torch.Tensor | BaseException]:
        """Forward thread: one forward per (modality, input size) present; per job its rows or its error."""
        results: list = [None] * len(jobs)
        for key in dict.fromkeys(j.shape_key for j in jobs):
            modality, size = key
            idx = [i for i, j in enumerate(jobs) if j.shape_key == key]
            try:
                with self.backbone.sizes.at(size) if size is not None else contextlib.nullcontext():
                    outs = self._forward_modality(modality, [jobs[i] for i in idx], size in (None, self.backbone.input_size))
            except Exception as e:  # one failing forward fails its jobs, never the loop
                log.exception("forward of %d %s jobs failed", len(idx), modality)
                outs = [e] * len(idx)
            for i, out in zip(idx, outs):
                results[i] = out
        return results

    def _forward_modality(self, modality: str, jobs: list[Job], at_base_size: bool = True) -> list[torch.Tensor | BaseException]:
        records: list[AdapterRecord] = []
        slot: dict[int, int] = {}
        for job in jobs:
            if job.record is not None and id(job.record) not in slot:
                slot[id(job.record)] = len(records)
                records.append(job.record)
        adapters = self.registry.device_adapters(records)
        row_adapter = [slot[id(j.record)] if j.record is not None else -1 for j in jobs for _ in range(j.rows)]
        inputs = torch.cat([j.inputs for j in jobs]).to(self.backbone.device)
        self.on_batch(modality, inputs.shape[0])
        out = self._encode(modality, inputs, adapters, row_adapter, at_base_size).cpu()
        return [o if torch.isfinite(o).all() else _non_finite(j.record) for j, o in zip(jobs, out.split([j.rows for j in jobs]))]

    def _encode(self, modality: str, inputs: torch.Tensor, adapters: list[DeviceAdapter], row_adapter: list[int],
                at_base_size: bool = True) -> torch.Tensor:
        if self.graphs is not None and at_base_size:
            out = self.graphs.run(modality, inputs, adapters, row_adapter)
            if out is not None:
                return out
        return forward_mixed(self.backbone, inputs, adapters, row_adapter, modality, self.config)  # metadata built once per batch

    def _zero_shot_weights(self, record: AdapterRecord | None, labels: tuple[str, ...]) -> torch.Tensor:
        """Forward thread: class weights from prompt templates, text tower under the adapter."""
        key = (None if record is None else record.key, labels)
        if key not in self._zero_shot:
            adapters = self.registry.device_adapters([record] if record is not None else [])

            def encode_text(tokens: torch.Tensor) -> torch.Tensor:
                return self._encode("text", tokens, adapters, [0 if record is not None else -1] * tokens.shape[0])

            self._zero_shot[key] = zero_shot_weights(self.backbone, list(labels), encode_text=encode_text).cpu()
            while len(self._zero_shot) > 64:
                self._zero_shot.popitem(last=False)
        self._zero_shot.move_to_end(key)
        return self._zero_shot[key]


def _non_finite(record: AdapterRecord | None) -> NonFiniteOutputError:
    what = "the base model" if record is None else f"adapter {record.name!r}"
    return NonFiniteOutputError(f"{what} produced non-finite values (NaN or Inf) for this input")
