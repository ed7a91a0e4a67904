"""Request inputs to model tensors: base64 images through the library's preprocessing, texts
through the tokenizer, each checked against the server's limits with a typed error."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from selora.models.factory import Backbone


class InputError(ValueError):
    """A request input the server cannot use; the subclass says which limit or problem."""


class ImageDecodeError(InputError):
    pass


class ImageTooLargeError(InputError):
    pass


class TextTooLongError(InputError):
    pass


class TooManyInputsError(InputError):
    pass


class EmptyInputError(InputError):
    pass


class UnsupportedModalityError(InputError):
    pass


@dataclass(frozen=True)
class Limits:
    max_inputs: int = 64  # inputs per request
    max_image_pixels: int = 4096 * 4096  # width x height of one decoded image
    max_text_chars: int = 2048  # characters of one text


def check_count(inputs: list, limits: Limits) -> None:
    if not inputs:
        raise EmptyInputError("input must hold at least one item")
    if len(inputs) > limits.max_inputs:
        raise TooManyInputsError(f"{len(inputs)} inputs in one request; the limit is {limits.max_inputs}")


def decode_image(data: str, limits: Limits) -> Image.Image:
    """A base64 data URI (``data:image/png;base64,...``) or bare base64 string as an RGB image.

    The header's size is checked against ``max_image_pixels`` before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    if not isinstance(data, str):
        raise ImageDecodeError("an image input must be a base64 string")
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageDecodeError("a data URI image must look like data:image/<type>;base64,<data>")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels")
            return img.convert("RGB")
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable/truncated files
        raise ImageDecodeError(f"cannot decode image: {e}") from None


def preprocess_images(backbone: Backbone, images: list[str], limits: Limits, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[n, 3, H, W]``: decoded images through the model library's own eval transform at ``size``
    (default: the size the backbone is built at)."""
    check_count(images, limits)
    transform = backbone.sizes.transform(size or backbone.input_size)
    return torch.stack([transform(decode_image(s, limits)) for s in images]).to(backbone.dtype)


def tokenize_texts(backbone: Backbone, texts: list[str], limits: Limits) -> torch.Tensor:
    """``[n, context_length]`` tokens of texts within ``max_text_chars``."""
    if "text" not in backbone.modalities:
        raise UnsupportedModalityError(f"base model {backbone.model_id} has no text tower: only images are served")
    check_count(texts, limits)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"input[{i}] must be a string")
        if len(t) > limits.max_text_chars:
            raise TextTooLongError(f"input[{i}] has {len(t)} characters; the limit is {limits.max_text_chars}")
    return backbone.tokenize(texts)
