"""What makes ``/v1/embeddings`` and ``/v1/models`` what OpenAI clients expect (OpenAI's API
reference for embeddings and models): which modality an input is, ``dimensions``,
``encoding_format`` and the model objects."""

from __future__ import annotations

import base64

import numpy as np
import torch

from selora.runtime.inputs import InputError

URL_PREFIXES = ("http://", "https://")


class UrlInputError(InputError):
    """An input given as a URL: the server never fetches URLs."""


class DimensionsError(InputError):
    """``dimensions`` other than the model's width."""


def resolve_modality(modality: str, inputs: list[str], modalities: tuple[str, ...]) -> str:
    """``image`` or ``text`` for a request. ``auto``: a ``data:`` URI is an image; any other string
    is text on a base with a text tower, bare base64 on an image-only base. URLs are refused."""
    if modality != "text":
        for i, item in enumerate(inputs):
            if isinstance(item, str) and item.lower().startswith(URL_PREFIXES):
                raise UrlInputError(f"input[{i}] is a URL; the server never fetches URLs: send the image as a base64 data URI")
    if modality != "auto":
        return modality
    kinds = {"image" if item.startswith("data:") or "text" not in modalities else "text" for item in inputs}
    if len(kinds) > 1:
        raise InputError("one request holds either images (data: URIs) or texts, not both; send them separately")
    return kinds.pop() if kinds else "image"


def check_dimensions(dimensions: int | None, width: int) -> None:
    if dimensions is not None and dimensions != width:
        raise DimensionsError(
            f"dimensions={dimensions} is not supported: this model's embeddings have {width} dimensions and were not "
            f"trained to be shortened (not Matryoshka); omit dimensions or pass {width}")


def encode(vectors: torch.Tensor, encoding_format: str) -> list:
    """Per row a list of floats, or (``base64``) the base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        rows = vectors.float().numpy().astype("<f4")
        return [base64.b64encode(np.ascontiguousarray(r).tobytes()).decode() for r in rows]
    return vectors.tolist()
