"""``create_app(settings, engine=None)``: the FastAPI app, its lifespan and middleware.

Without an engine the lifespan loads the base model and the store's adapters in a background
thread (``/health`` answers at once, ``/ready`` once loading is done) and stops the engine
cleanly at shutdown. Tests pass a ready engine built on a tiny model.

Middleware, outermost first: the Origin gate (403), CORS for allowed origins, authentication and
rate limits (401 / 429), the body limit (413), then the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware

from selora.models.factory import Backbone, load_backbone
from selora.runtime.engine import Engine
from selora.runtime.registry import AdapterRegistry, import_tree
from selora.runtime.store import DEFAULT_TENANT, AdapterStore
from selora.runtime.graphs import CudaGraphs
from selora.runtime.warmup import device_sample, warm_up
from selora.server import docs, errors, openapi
from selora.server.auth import Authenticate, OriginGate
from selora.server.body import BodyGate
from selora.server.metrics import Metrics
from selora.server.routes import router
from selora.server.settings import MiB, Settings

log = logging.getLogger("selora.server")


def build_engine(settings: Settings, metrics: Metrics | None = None, backbone: Backbone | None = None,
                 store: AdapterStore | None = None) -> Engine:
    """Load the base model (unless given one), open the store (unless given one: remove crash
    debris, import an existing import root once), register its adapters, return an (unstarted)
    engine. The server, the benchmarks and the tests all build their engines here."""
    config = settings.kernel_config()  # a bad kernel setting is refused before the model loads
    backbone = backbone or load_backbone(settings.model, settings.weights, settings.torch_device(), settings.torch_dtype())
    store = store or open_store(settings)
    registry = AdapterRegistry(
        backbone, store, int(settings.host_cache_mb * MiB), int(settings.device_cache_mb * MiB),
        metrics.on_registry_event if metrics else None, settings.import_root,
    )
    _import_once(registry, settings)
    names = registry.preload()
    log.info(
        "base %s (%s, %d blocks, fingerprint %s) on %s in %s; kernel backend %s; %d adapters in the store",
        backbone.model_id, backbone.library, len(backbone.blocks), backbone.fingerprint, backbone.device,
        str(backbone.dtype).removeprefix("torch."), config.backend, len(names),
    )
    sizes = [r.entry.info["input_size"] for r in registry.current() if r.entry.info.get("input_size")]
    warmed = warm_up(backbone, settings.max_batch_size, config, sizes=sizes)  # compiles the GPU kernels before /ready
    if warmed:
        log.info("warm-up: %d forwards compiled and tuned the kernel for batches up to %d", warmed, settings.max_batch_size)
    graphs = None
    if settings.cuda_graphs:  # kernel_config() refused it unless CUDA + Triton
        graphs = CudaGraphs(backbone, registry.slots, config, settings.max_batch_size)
        made = graphs.capture({m: device_sample(backbone, m) for m in backbone.modalities})
        log.info("CUDA graphs: %d captured (batch buckets %s)", made, graphs.buckets)
    return Engine(
        backbone, registry, settings.limits, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
        metrics.on_batch if metrics else None, config, graphs,
    )


def open_store(settings: Settings) -> AdapterStore:
    """The server's store, crash debris and unreferenced blobs removed."""
    store = AdapterStore(settings.store)
    debris, blobs = store.recover()
    if debris or blobs:
        log.warning("store: removed %d temporary files and %d unreferenced blobs left by an interrupted run", debris, blobs)
    if not store.has_keys():
        log.warning("the store holds no API key: every caller is the admin of tenant %r (create one: selora keys create)", DEFAULT_TENANT)
    return store


def _import_once(registry: AdapterRegistry, settings: Settings) -> None:
    """An existing adapter root (today's import root) is copied into the store at the first start."""
    root = registry.import_root
    if root is None or not root.is_dir() or registry.store.imported(str(root)):
        return
    names = import_tree(registry.store, root, DEFAULT_TENANT, registry.backbone.blocks, registry.serving)
    registry.store.mark_imported(str(root))
    if names:
        log.warning("imported %d adapters from %s into the store as tenant %r, once: later changes there are not "
                    "re-imported (use selora store import)", len(names), root, DEFAULT_TENANT)


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The app; without ``engine`` it loads one in the background, and a failed load calls
    ``on_load_failure`` (``selora serve`` stops the server and exits non-zero naming the cause)."""
    settings = settings or Settings.load()
    metrics = Metrics()
    store = engine.registry.store if engine is not None else open_store(settings)
    if engine is not None:
        engine.on_batch = metrics.on_batch
        engine.registry.listener = metrics.on_registry_event

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = None
        if app.state.engine is not None:
            await app.state.engine.start()
        else:
            loading = asyncio.create_task(_load(app, settings, metrics, store, on_load_failure or (lambda: None)))
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loading
            if app.state.engine is not None:
                await app.state.engine.stop()
            log.info("stopped")

    app = FastAPI(title="selora", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Embeddings and classification with sparse LoRA/DoRA adapters on one CLIP/DINO base")
    docs.install(app)
    app.state.engine, app.state.metrics, app.state.settings, app.state.load_error = engine, metrics, settings, None
    app.state.store = store
    errors.install(app, metrics.on_error)
    openapi.install(app)
    app.include_router(router)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        path = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        adapter, engine = getattr(request.state, "adapter", "none"), app.state.engine
        if adapter != "none" and (engine is None or not engine.knows(adapter)):
            adapter = "unknown"  # a name nobody registered never becomes a label
        metrics.on_response(path, response.status_code, adapter)
        return response

    app.add_middleware(BodyGate, max_bytes=settings.max_body_bytes, on_error=metrics.on_error)
    app.add_middleware(Authenticate, store=store, on_request=metrics.on_request, on_error=metrics.on_error)
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(OriginGate, allowed=settings.allowed_origins)
    return app


async def _load(app: FastAPI, settings: Settings, metrics: Metrics, store: AdapterStore, on_failure: Callable[[], None]) -> None:
    try:
        engine = await asyncio.to_thread(build_engine, settings, metrics, None, store)
    except Exception as e:  # /ready explains it until on_failure has stopped the process
        log.debug("loading %s failed", settings.model, exc_info=True)
        app.state.load_error = f"loading {settings.model} failed: {type(e).__name__}: {e}"
        log.error("%s", app.state.load_error)
        on_failure()
        return
    await engine.start()
    app.state.engine = engine
    log.info("ready")

