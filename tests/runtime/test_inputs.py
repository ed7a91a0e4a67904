import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from selora.runtime.inputs import ImageDecodeError, Limits, decode_image, open_image, preprocess_image


def _opened(img: Image.Image, fmt: str = "PNG") -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return open_image(base64.b64encode(buf.getvalue()).decode(), Limits())


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))


def _image(mode: str) -> Image.Image:
    rgba = np.random.default_rng(0).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.filterwarnings("ignore:Palette images")  # the reference convert("RGB") of a P image with transparency
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocess_image_sees_the_pixels_of_convert_rgb(mode):
    expected = _pixels(_opened(_image(mode)).convert("RGB"))
    got = preprocess_image(_pixels, _opened(_image(mode)))
    assert got.shape == (24, 40, 3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_preprocess_image_releases_the_decoded_pixels(mode):
    """A request holds its opened images until its last one is decoded: each one's pixels must be
    freed as soon as it is preprocessed, not then (4 x 64 MB per request at the pixel budget)."""
    img = _opened(_image(mode))
    preprocess_image(_pixels, img)
    assert img.size == (40, 24)  # the header stays readable
    with pytest.raises(ValueError, match="closed"):
        img.tobytes()


def test_an_rgb_image_is_decoded_in_place_without_a_copy():
    img = _opened(_image("RGB"))
    assert decode_image(img) is img


def test_a_truncated_image_is_a_decode_error():
    buf = io.BytesIO()
    _image("RGB").save(buf, format="PNG")
    img = open_image(base64.b64encode(buf.getvalue()[:200]).decode(), Limits())
    with pytest.raises(ImageDecodeError):
        preprocess_image(_pixels, img)
