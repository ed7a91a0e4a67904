"""Request and response bodies of the REST API (DESIGN.md, REST contract)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class EmbeddingRequest(BaseModel):
    model: str = Field("base", description="adapter name, or 'base' for the base model alone")
    input: list[str] = Field(description="images (base64 data URIs or bare base64) or texts")
    modality: Literal["image", "text"] = "image"
    normalize: bool = Field(True, description="L2-normalise each embedding")

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float]


class Usage(BaseModel):
    inputs: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: Usage


class ClassifyRequest(BaseModel):
    model: str = Field("base", description="adapter name, or 'base'")
    input: list[str] = Field(description="images (base64 data URIs or bare base64)")
    labels: list[str] | None = Field(None, description="class names for CLIP zero-shot; null: the adapter's own head")
    top_k: int = Field(5, ge=1, le=1000)

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Prediction(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]
    usage: Usage


class LoadAdapterRequest(BaseModel):
    name: str = Field(description="adapter name, or tenant/name")
    path: str = Field(description="adapter directory, relative to the server's import root")


class AdapterInfo(BaseModel):
    name: str = Field(description="how the caller addresses it: its own bare, another tenant's (or a shared one) as tenant/name")
    tenant: str
    version: int = Field(description="store version: a replacement gets a new one, never reused")
    content_hash: str = Field(description="SHA-256 of adapter_model.safetensors")
    stored_bytes: int = Field(description="bytes in the store (config + weights), counted against the tenant's quota")
    base_model: str
    variant: str
    r: int
    lora_alpha: float
    active_blocks: list[str]
    num_active: int
    num_blocks: int
    bytes: int = Field(description="host bytes of the active blocks (and head)")
    device_bytes: int = Field(description="device bytes while resident on the device, else 0")
    resident_host: bool
    resident_device: bool
    head_classes: list[str] | None
    head_input: Literal["raw", "normalized"] | None = Field(
        None, description="what the head applies to: the embedding as served, or its L2-normalised form")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class Deleted(BaseModel):
    name: str
    deleted: bool = True


class BaseModelInfo(BaseModel):
    id: str
    library: str
    fingerprint: str
    embed_dim: int
    modalities: list[str]
    num_blocks: int
    device: str
    dtype: str


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    type: Literal["base", "adapter"]


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    base: BaseModelInfo
    kernel_backend: str
    data: list[ModelEntry]


class Status(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable error kind, e.g. invalid_image, adapter_not_found, payload_too_large")
    message: str = Field(description="what was wrong, for a person; never a server path")


class ErrorResponse(BaseModel):
    """The one error shape of every route (DESIGN.md, REST contract)."""

    error: ErrorDetail
