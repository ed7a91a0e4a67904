"""The endpoints of DESIGN.md. Routes reach the engine through ``Depends(get_engine)``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from selora.runtime.engine import BASE, Engine
from selora.runtime.inputs import InputError
from selora.runtime.registry import AdapterRecord
from selora.runtime.store import Caller
from selora.server import openai_compat, schemas
from selora.server.auth import can_use, get_caller, require_admin, shown_name, usable, writable
from selora.server.body import decode_json
from selora.server.errors import NotReadyError

router = APIRouter()

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": schemas.LoadAdapterRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "config", "weights"],
                    "properties": {
                        "name": {"type": "string"},
                        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
                    },
                }
            },
        },
    }
}


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise NotReadyError(getattr(request.app.state, "load_error", None) or "the base model is still loading")
    return engine


@router.get("/health", response_model=schemas.Status, tags=["service"])
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=schemas.Status, tags=["service"])
async def ready(engine: Engine = Depends(get_engine)) -> dict:
    return {"status": "ready"}


@router.get("/metrics", tags=["service"], response_class=Response)
async def metrics(request: Request, caller: Caller = Depends(get_caller)) -> Response:
    """Prometheus text; needs an admin key."""
    require_admin(caller)
    m = request.app.state.metrics
    return Response(m.render(getattr(request.app.state, "engine", None)), media_type=m.content_type)


def _visible(engine: Engine, caller: Caller) -> list[AdapterRecord]:
    return [r for r in engine.registry.current() if can_use(caller, r.tenant)]


@router.get("/v1/models", response_model=schemas.ModelsResponse, tags=["models"])
async def models(engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    b = engine.backbone
    records = _visible(engine, caller)
    return {
        "base": {
            "id": b.model_id, "library": b.library, "fingerprint": b.fingerprint, "embed_dim": b.embed_dim,
            "modalities": list(b.modalities), "num_blocks": len(b.blocks), "device": str(b.device), "dtype": str(b.dtype),
            "random_weights": b.random_weights, "preprocessing": b.preprocessing(),
        },
        "kernel_backend": engine.config.backend,
        "data": [_model_entry(engine, caller, None)] + [_model_entry(engine, caller, r) for r in records],
    }


@router.get("/v1/models/{model_id:path}", response_model=schemas.ModelEntry, tags=["models"])
async def get_model(model_id: str, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    """The OpenAI model object of the base (``base``) or of an adapter the caller may use."""
    return _model_entry(engine, caller, None if model_id == BASE else engine.registry.get(usable(caller, model_id)))


def _model_entry(engine: Engine, caller: Caller, record: AdapterRecord | None) -> dict:
    b = engine.backbone
    return {
        "id": BASE if record is None else shown_name(caller, record.tenant, record.name),
        "type": "base" if record is None else "adapter",
        "created": engine.created if record is None else int(record.entry.created), "base_model": b.model_id,
        "preprocessing": b.preprocessing(engine.input_size(record)),
    }


def _info(engine: Engine, caller: Caller, record: AdapterRecord) -> dict:
    d = engine.registry.describe(record)
    return {**d, "name": shown_name(caller, record.tenant, record.name), "num_active": len(d["active_blocks"]),
            "input_size": list(engine.input_size(record))}


@router.get("/v1/adapters", response_model=schemas.AdapterList, tags=["adapters"])
async def list_adapters(engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    """The caller's adapters and the shared ones (an admin: every tenant's, as ``tenant/name``)."""
    return {"data": [_info(engine, caller, r) for r in _visible(engine, caller)]}


@router.get("/v1/adapters/{name}", response_model=schemas.AdapterInfo, tags=["adapters"])
async def get_adapter(name: str, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    return _info(engine, caller, engine.registry.get(usable(caller, name)))


@router.get("/v1/adapters/{tenant}/{name}", response_model=schemas.AdapterInfo, tags=["adapters"])
async def get_tenant_adapter(tenant: str, name: str, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    return await get_adapter(f"{tenant}/{name}", engine, caller)


@router.post("/v1/adapters", response_model=schemas.AdapterInfo, tags=["adapters"], openapi_extra=UPLOAD_BODY)
async def load_adapter(request: Request, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    """Upload an adapter's two files (multipart) or, with an admin key, copy a directory from the
    server's import root (JSON). The store commits before the answer; a name in use is replaced.
    ``name`` may be ``tenant/name`` (admins: any tenant, ``shared/...`` for shared adapters)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        name, config, weights = form.get("name"), form.get("config"), form.get("weights")
        if not isinstance(name, str) or not hasattr(config, "read") or not hasattr(weights, "read"):
            raise InputError("multipart upload needs a text field 'name' and the files 'config' and 'weights'")
        tenant, name = writable(caller, name)
        config_bytes, weights_bytes = await config.read(), await weights.read()
        record = await asyncio.to_thread(engine.registry.put, tenant, name, config_bytes, weights_bytes)
    else:
        require_admin(caller)  # the JSON form reads the server's disk
        try:
            body = schemas.LoadAdapterRequest.model_validate(decode_json(await request.body()))
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        tenant, name = writable(caller, body.name)
        record = await asyncio.to_thread(engine.registry.import_dir, tenant, name, body.path)
    return _info(engine, caller, record)


@router.delete("/v1/adapters/{name}", response_model=schemas.Deleted, tags=["adapters"])
async def delete_adapter(name: str, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    """Delete an adapter from the store (one transaction); in-flight requests finish on it."""
    tenant, bare = writable(caller, name)
    await asyncio.to_thread(engine.registry.delete, tenant, bare)
    return {"name": name}


@router.delete("/v1/adapters/{tenant}/{name}", response_model=schemas.Deleted, tags=["adapters"])
async def delete_tenant_adapter(tenant: str, name: str, engine: Engine = Depends(get_engine), caller: Caller = Depends(get_caller)) -> dict:
    return await delete_adapter(f"{tenant}/{name}", engine, caller)


def _model(request: Request, caller: Caller, model: str) -> str:
    """The address of ``model`` for this caller; also the metrics' adapter label of the request."""
    request.state.adapter = "unknown"  # until resolved: a name the caller may not use is no label
    request.state.adapter = address = model if model == BASE else usable(caller, model)
    return address


@router.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, tags=["inference"])
async def embeddings(body: schemas.EmbeddingRequest, request: Request, engine: Engine = Depends(get_engine),
                     caller: Caller = Depends(get_caller)) -> dict:
    """OpenAI-compatible embeddings of images or texts, under an adapter or the base."""
    openai_compat.check_dimensions(body.dimensions, engine.backbone.embed_dim)
    modality = openai_compat.resolve_modality(body.modality, body.input, engine.backbone.modalities)
    out = await engine.embed(_model(request, caller, body.model), modality, body.input, body.normalize, caller.tenant)
    rows = openai_compat.encode(out.vectors, body.encoding_format)
    return {
        "model": body.model,
        "data": [{"index": i, "embedding": row} for i, row in enumerate(rows)],
        "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
    }


@router.post("/v1/classify", response_model=schemas.ClassifyResponse, tags=["inference"])
async def classify(body: schemas.ClassifyRequest, request: Request, engine: Engine = Depends(get_engine),
                   caller: Caller = Depends(get_caller)) -> dict:
    results = await engine.classify(_model(request, caller, body.model), body.input, body.labels, body.top_k, caller.tenant)
    return {
        "model": body.model,
        "data": [{"index": i, "predictions": [{"label": l, "score": s} for l, s in preds]} for i, preds in enumerate(results)],
        "usage": {"inputs": len(body.input)},
    }
