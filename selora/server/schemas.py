"""Request and response bodies of the REST API (DESIGN.md, REST contract)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class EmbeddingRequest(BaseModel):
    model: str = Field("base", description="adapter name, or 'base' for the base model alone")
    input: list[str] = Field(description="one string or a list: images (base64 data URIs, or bare base64 on an "
                                         "image-only base) or texts; URLs are refused (never fetched)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': lists of numbers; 'base64': each embedding's little-endian float32 bytes")
    dimensions: int | None = Field(None, description="must equal the model's width (these embeddings cannot be shortened)")
    modality: Literal["auto", "image", "text"] = Field(
        "auto", description="auto: a data: URI is an image; any other string is text on a CLIP base, bare base64 otherwise")
    normalize: bool = Field(True, description="L2-normalise each embedding")
    user: str | None = Field(None, description="accepted for OpenAI compatibility; unused")

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (encoding_format)")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="text tokens, or for images the image tokens processed (patches + class token)")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class Usage(BaseModel):
    inputs: int


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
    input_size: list[int] = Field(description="[height, width] its rows are served at: the size it was trained at")
    head_input: Literal["raw", "normalized"] | None = Field(
        None, description="what the head applies to: the embedding as served, or its L2-normalised form")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class Deleted(BaseModel):
    name: str
    deleted: bool = True


class Preprocessing(BaseModel):
    """The model library's own eval transform at the size a model's images are served at."""

    input_size: list[int] = Field(description="[height, width] fed to the model")
    resize: int | list[int] | None = Field(None, description="an int: the shorter side is resized to it; a list: [height, width]")
    interpolation: str | None = None
    crop: list[int] | None = Field(None, description="centre crop [height, width]")
    mean: list[float] | None = None
    std: list[float] | None = None


class BaseModelInfo(BaseModel):
    id: str
    library: str
    fingerprint: str
    embed_dim: int
    modalities: list[str]
    num_blocks: int
    device: str
    dtype: str
    random_weights: bool = Field(description="no weights were loaded: random init (test models)")
    preprocessing: Preprocessing


class ModelEntry(BaseModel):
    """An OpenAI model object, with what selora adds."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "selora"
    type: Literal["base", "adapter"]
    base_model: str
    preprocessing: Preprocessing


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
