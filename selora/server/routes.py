"""The endpoints of DESIGN.md. Routes reach the engine through ``Depends(get_engine)``."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from selora.kernels.ops import kernel_backend
from selora.runtime.engine import BASE, Engine
from selora.runtime.inputs import InputError
from selora.runtime.registry import AdapterRecord, UnknownAdapterError
from selora.server import schemas
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
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(getattr(request.app.state, "engine", None)), media_type=m.content_type)


@router.get("/v1/models", response_model=schemas.ModelsResponse, tags=["models"])
async def models(engine: Engine = Depends(get_engine)) -> dict:
    b = engine.backbone
    names = engine.registry.names()
    return {
        "base": {
            "id": b.model_id, "library": b.library, "fingerprint": b.fingerprint, "embed_dim": b.embed_dim,
            "modalities": list(b.modalities), "num_blocks": len(b.blocks), "device": str(b.device), "dtype": str(b.dtype),
        },
        "kernel_backend": kernel_backend(b.device),
        "data": [{"id": BASE, "type": "base"}] + [{"id": n, "type": "adapter"} for n in names],
    }


def _info(engine: Engine, record: AdapterRecord) -> dict:
    d = engine.registry.describe(record)
    return {**d, "num_active": len(d["active_blocks"])}


@router.get("/v1/adapters", response_model=schemas.AdapterList, tags=["adapters"])
async def list_adapters(engine: Engine = Depends(get_engine)) -> dict:
    records = []
    for name in engine.registry.names():
        try:
            records.append(engine.registry.get(name))
        except UnknownAdapterError:  # deleted meanwhile
            continue
    return {"data": [_info(engine, r) for r in records]}


@router.get("/v1/adapters/{name}", response_model=schemas.AdapterInfo, tags=["adapters"])
async def get_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict:
    return _info(engine, engine.registry.get(name))


@router.post("/v1/adapters", response_model=schemas.AdapterInfo, tags=["adapters"], openapi_extra=UPLOAD_BODY)
async def load_adapter(request: Request, engine: Engine = Depends(get_engine)) -> dict:
    """Load an adapter directory under the adapter root (JSON) or upload its two files (multipart).
    A name in use is replaced atomically."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        name, config, weights = form.get("name"), form.get("config"), form.get("weights")
        if not isinstance(name, str) or not hasattr(config, "read") or not hasattr(weights, "read"):
            raise InputError("multipart upload needs a text field 'name' and the files 'config' and 'weights'")
        config_bytes, weights_bytes = await config.read(), await weights.read()
        record = await asyncio.to_thread(engine.registry.upload, name, config_bytes, weights_bytes)
    else:
        try:
            body = schemas.LoadAdapterRequest.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as e:
            raise InputError(f"body is not JSON: {e}") from None
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        record = await asyncio.to_thread(engine.registry.load, body.name, body.path)
    return _info(engine, record)


@router.delete("/v1/adapters/{name}", response_model=schemas.Deleted, tags=["adapters"])
async def delete_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict:
    """Unregister an adapter (its files stay under the adapter root); in-flight requests finish."""
    engine.registry.delete(name)
    return {"name": name}


@router.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, tags=["inference"])
async def embeddings(body: schemas.EmbeddingRequest, engine: Engine = Depends(get_engine)) -> dict:
    out = await engine.embed(body.model, body.modality, body.input, body.normalize)
    return {
        "model": body.model,
        "data": [{"index": i, "embedding": row} for i, row in enumerate(out.tolist())],
        "usage": {"inputs": len(body.input)},
    }


@router.post("/v1/classify", response_model=schemas.ClassifyResponse, tags=["inference"])
async def classify(body: schemas.ClassifyRequest, engine: Engine = Depends(get_engine)) -> dict:
    results = await engine.classify(body.model, body.input, body.labels, body.top_k)
    return {
        "model": body.model,
        "data": [{"index": i, "predictions": [{"label": l, "score": s} for l, s in preds]} for i, preds in enumerate(results)],
        "usage": {"inputs": len(body.input)},
    }
