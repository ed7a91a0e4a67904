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
    max_image_aspect: float = 16.0  # long side / short side of one image
    max_request_pixels: int = 4 * 4096 * 4096  # decoded pixels of all images of one request


# Formats whose decoders are plain and bounded by the pixel count (no EPS/Ghostscript, no
# multi-codec TIFF, no PSD layers).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def check_count(inputs: list, limits: Limits) -> None:
    if not inputs:
        raise EmptyInputError("input must hold at least one item")
    if len(inputs) > limits.max_inputs:
        raise TooManyInputsError(f"{len(inputs)} inputs in one request; the limit is {limits.max_inputs}")


def open_image(data: str, limits: Limits) -> Image.Image:
    """A base64 data URI (``data:image/png;base64,...``) or bare base64 string, opened but not
    decoded: only its header is read, and its cost is bounded before any pixel is decoded.

    The decoded size is bounded by ``max_image_pixels``; the resized size by
    ``max_image_aspect`` (an eval transform resizes the short side to its input size ``S``, so
    an image becomes at most ``S² · max_image_aspect`` pixels before its crop).
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
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"image rejected as a decompression bomb; the limit is {limits.max_image_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageDecodeError("cannot read the image header (corrupt or truncated)") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image is {width}x{height} pixels")
    if width * height > limits.max_image_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels")
    if max(width, height) > limits.max_image_aspect * min(width, height):
        raise ImageTooLargeError(f"image is {width}x{height} pixels; the aspect ratio limit is {limits.max_image_aspect:g}:1")
    return img


def open_images(images: list[str], limits: Limits) -> list[Image.Image]:
    """Every image of one request opened (headers only), the request's total bounded."""
    check_count(images, limits)
    opened = [open_image(s, limits) for s in images]
    total = sum(img.width * img.height for img in opened)
    if total > limits.max_request_pixels:
        raise ImageTooLargeError(f"the request's images hold {total} pixels; the limit is {limits.max_request_pixels} per request")
    return opened


def decode_image(img: Image.Image) -> Image.Image:
    """Decode an image from ``open_image`` as RGB (its cost already bounded): in place when it is
    RGB already (no copy of a decoded image that may be 64 MB), else a converted copy, the
    source's pixels released."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.mode == "RGB":
                return img
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageDecodeError("cannot decode the image (corrupt or truncated)") from None
    img.close()
    return rgb


def preprocess_images(backbone: Backbone, images: list[str], limits: Limits, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[n, 3, H, W]``: decoded images through the model library's own eval transform at ``size``
    (default: the size the backbone is built at)."""
    transform = backbone.sizes.transform(size or backbone.input_size)
    return torch.stack([preprocess_image(transform, img) for img in open_images(images, limits)]).to(backbone.dtype)


def preprocess_image(transform, img: Image.Image) -> torch.Tensor:
    """One opened image (its cost already checked) decoded and through the library's eval transform.

    Its decoded pixels are released as soon as the transform has run, although the caller still
    holds ``img``: a request of several large images then holds one decoded image per decode
    thread, not every image it has decoded until its last one is done (4 × 64 MB for a request at
    the default pixel budget)."""
    rgb = decode_image(img)
    try:
        return transform(rgb)
    finally:
        rgb.close()


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
