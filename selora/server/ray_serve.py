"""selora on Ray Serve: one ingress and N engine replicas sharing one adapter store.

- **Ingress** (one replica): the same FastAPI app as ``selora serve`` — auth, tenants, rate
  limits, uploads and deletes (validated against a CPU copy of the base, committed to the store).
  Its engine is a ``RemoteEngine``: embeddings and classifications go to the engine replicas.
- **Engine replicas**: each loads the base model, its own host/device caches and its own dynamic
  batcher (rows of different adapters share a batch, as in one process; Ray's ``@serve.batch``
  would split batches by model id, so it is not used).
- **Adapter-affine routing** through Ray Serve's model multiplexing: a request for an adapter
  carries the multiplexed model id ``tenant/name@version``, read from the store's committed
  manifest for every request, so Ray prefers replicas that already hold that version. Base
  requests carry none and go anywhere.
- **One store**: every process opens the same store directory (a local disk for one machine, a
  shared filesystem for several). A replica asked for a version it does not hold reloads that
  tenant/name from the store before it answers, so an upload, replace or delete acknowledged
  through the ingress is what every replica serves from then on. Only the ingress cleans crash
  debris at start-up (a replica doing so could remove a blob the ingress is writing).
- Every response carries ``X-Selora-Replica``: the engine replica that computed it, or the
  ingress's id for everything else. A replica that dies under a request is retried on another;
  if none answers in time the request gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import uuid
from dataclasses import asdict

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from selora.runtime.engine import BASE, Embeddings, EngineStoppedError
from selora.runtime.registry import UnknownAdapterError
from selora.runtime.store import AdapterStore
from selora.server.app import build_engine, create_app, open_store
from selora.server.settings import MiB, Settings, SettingsError

log = logging.getLogger("selora.ray")

REPLICA = contextvars.ContextVar("selora_replica")  # [replica id] of the response being made
RETRIES = 2  # a dead replica's request is tried again this many times on another one
CALL_TIMEOUT_S = 120.0  # no request waits longer for an engine replica


class ReplicaUnavailableError(EngineStoppedError):
    """No engine replica answered (one died and none took over in time): 503 + Retry-After."""

    retry_after = 2


def model_id(tenant: str, name: str, version: int) -> str:
    return f"{tenant}/{name}@{version}"


def parse_model_id(mid: str) -> tuple[str, str, int]:
    ref, _, version = mid.rpartition("@")
    tenant, _, name = ref.partition("/")
    return tenant, name, int(version)


def adapters_per_replica(settings: Settings, store: AdapterStore) -> int:
    """Ray's per-replica model count, from the device cache: its budget over the mean stored
    adapter size (1 MiB when the store is empty), at least 4."""
    sizes = [e.info["bytes"] for e in store.entries()]
    mean = sum(sizes) / len(sizes) if sizes else MiB
    return max(4, int(settings.device_cache_mb * MiB // mean))


@serve.deployment(name="SeloraEngine")
class EngineReplica:
    """One base model, its caches and its batcher; answers ``embed`` and ``classify``."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        store = AdapterStore(self.settings.store)  # no recover(): the ingress owns the store's debris
        self.engine = build_engine(self.settings, store=store)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def load(mid: str) -> str:
            await asyncio.to_thread(self.engine.registry.refresh)  # the ingress committed mid's version
            return mid

        self._adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica(self.settings, store))(load)

    async def _prepared(self, mid: str) -> str:
        if not self.engine.running:
            await self.engine.start()
        if mid == BASE:
            return BASE
        await self._adapter(mid)
        tenant, name, _ = parse_model_id(mid)
        return f"{tenant}/{name}"

    async def embed(self, mid: str, modality: str, inputs: list, normalize: bool,
                    client: str | None = None) -> tuple[tuple[np.ndarray, int], str]:
        out = await self.engine.embed(await self._prepared(mid), modality, inputs, normalize, client)
        return (out.vectors.numpy(), out.tokens), self.replica_id

    async def classify(self, mid: str, images: list, labels: list[str] | None, top_k: int,
                       client: str | None = None) -> tuple[list, str]:
        return await self.engine.classify(await self._prepared(mid), images, labels, top_k, client), self.replica_id


class RemoteEngine:
    """The engine face the routes use, with the forward on the engine replicas: the registry is
    the ingress's own (a CPU copy of the base validates uploads), ``embed``/``classify`` are calls
    to the replicas, routed by the adapter's committed version."""

    def __init__(self, local, handle):
        self.local, self.handle = local, handle  # local: an Engine that is never started
        self.registry, self.backbone, self.config = local.registry, local.backbone, local.config
        self.on_batch = None
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    # what the routes and /metrics read besides embed/classify: the ingress's own view (queues
    # and running requests live on the replicas, so the ingress reports none)
    def input_size(self, record) -> tuple[int, int]:
        return self.local.input_size(record)

    def knows(self, model: str) -> bool:
        return self.local.knows(model)

    def requests_by_adapter(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.local.requests_by_adapter()

    @property
    def created(self) -> int:
        return self.local.created

    @property
    def max_batch_size(self) -> int:
        return self.local.max_batch_size

    @property
    def queued_rows(self) -> int:
        return self.local.queued_rows

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False

    def _model_id(self, model: str) -> str:
        if model == BASE:
            return BASE
        tenant, _, name = model.partition("/")
        entry = self.registry.store.entry(tenant, name)  # the committed version, read for every request
        if entry is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return model_id(tenant, name, entry.version)

    async def _call(self, method: str, model: str, *args):
        mid = self._model_id(model)
        handle = self.handle if mid == BASE else self.handle.options(multiplexed_model_id=mid)
        for attempt in range(RETRIES + 1):
            try:
                result, replica = await asyncio.wait_for(getattr(handle, method).remote(mid, *args), CALL_TIMEOUT_S)
            except RayTaskError as e:  # the replica refused the request: the original error, its message only
                raise e.cause from None
            except (RayActorError, DeploymentUnavailableError, RequestCancelledError, BackPressureError, asyncio.TimeoutError) as e:
                log.warning("engine replica unavailable (%s), attempt %d of %d", type(e).__name__, attempt + 1, RETRIES + 1)
                continue
            box = REPLICA.get(None)
            if box is not None:
                box[0] = replica
            return result
        raise ReplicaUnavailableError("no engine replica answered; retry shortly")

    async def embed(self, model: str, modality: str, inputs: list, normalize: bool = False, client: str | None = None) -> Embeddings:
        vectors, tokens = await self._call("embed", model, modality, inputs, normalize, client)
        return Embeddings(torch.from_numpy(vectors), tokens)

    async def classify(self, model: str, images: list, labels: list[str] | None, top_k: int, client: str | None = None) -> list:
        return await self._call("classify", model, images, labels, top_k, client)


class ReplicaHeader:
    """ASGI middleware: ``X-Selora-Replica`` on every response (the engine replica's id where one
    computed the answer, else the ingress's)."""

    def __init__(self, app, ingress_id: str):
        self.app, self.ingress_id = app, ingress_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        box = [self.ingress_id]
        REPLICA.set(box)

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-selora-replica", box[0].encode())]
            await send(message)

        await self.app(scope, receive, send_with_replica)


@serve.deployment(name="SeloraIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})  # like Serve's own HTTP proxy
@serve.ingress()
class Ingress:
    """The FastAPI app of ``selora serve``, its engine calls sent to the engine replicas."""

    def __init__(self, engine_handle, settings: dict):
        self.settings = Settings(**{**settings, "device": "cpu", "dtype": "float32"})
        local = build_engine(self.settings, store=open_store(self.settings))
        self.remote = RemoteEngine(local, engine_handle)
        self.ingress_id = "ingress-" + uuid.uuid4().hex[:8]

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings, self.remote)
        app.add_middleware(ReplicaHeader, ingress_id=self.ingress_id)
        return app


def build_application(settings: Settings, replicas: int = 2, autoscale: tuple[int, int] | None = None) -> serve.Application:
    """The Ray Serve application: the ingress bound to ``replicas`` engine replicas (or an
    autoscaling range)."""
    options = {"num_replicas": replicas}
    if autoscale is not None:
        options = {"num_replicas": "auto", "autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1]}}
    if settings.torch_device().type == "cuda":
        options["ray_actor_options"] = {"num_gpus": 1}
    values = asdict(settings)
    return Ingress.bind(EngineReplica.options(**options).bind(values), values)


def app_builder(args: dict) -> serve.Application:
    """Entry point of a Ray Serve config file (``deploy/serve.yaml``): ``args`` are Settings
    fields (``replicas``, ``autoscale: "MIN:MAX"`` among them)."""
    settings = Settings.load(env={f"SELORA_{k.upper()}": str(v) for k, v in args.items() if v is not None})
    return build_application(settings, settings.replicas, parse_autoscale(settings.autoscale) if settings.autoscale else None)


def run_on_ray(settings: Settings) -> int:
    """``selora serve --ray``: join ``--ray-address`` or start a local Ray instance, serve the
    application on ``--host``/``--port`` until interrupted. Ctrl-C or SIGTERM stop it cleanly
    (exit 0): the application leaves a joined cluster; a local instance shuts down."""
    import ray

    autoscale = parse_autoscale(settings.autoscale) if settings.autoscale else None  # refused before Ray starts
    ray.init(address=settings.ray_address or None)
    signal.signal(signal.SIGTERM, _interrupt)  # replaces the handler ray.init set, which dumps native stacks and dies
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, settings.replicas, autoscale), name="selora", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("stopping: the application leaves the cluster")
        serve.delete("selora")
    finally:
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = str(text).partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 1 <= int(lo) <= int(hi):
        raise SettingsError(f"autoscale must be MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(lo), int(hi)
