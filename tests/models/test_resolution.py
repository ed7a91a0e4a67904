"""Input sizes: which a base can take, timm's transform per size, the model restored after a
forward at another size (also when it fails), position grids cached per size."""

import copy

import pytest
import torch

from selora.models.resolution import InputSizeError


def test_which_sizes_a_base_takes(tiny_vit, tiny_clip):
    assert tiny_vit.sizes.check([16, 24]) == (16, 24) and tiny_vit.sizes.check((128, 128)) == (128, 128)
    for bad, words in [([20, 32], "multiples of its patch"), ([136, 32], "up to"), ([0, 8], "multiples"),
                       ([32], "height, width"), (["32", 32], "height, width"), ([True, 8], "height, width")]:
        with pytest.raises(InputSizeError, match=words):
            tiny_vit.sizes.check(bad)
    assert tiny_clip.sizes.check([32, 32]) == (32, 32)
    with pytest.raises(InputSizeError, match="runs at \\[32, 32\\] only"):
        tiny_clip.sizes.check([64, 64])


def test_forward_at_another_size_equals_timm_set_input_size_and_restores(tiny_vit):
    x = torch.randn(2, 3, 48, 16)
    resized = copy.deepcopy(tiny_vit.model)
    resized.set_input_size(img_size=(48, 16))
    built = tiny_vit.model.pos_embed
    with torch.no_grad(), tiny_vit.sizes.at((48, 16)):
        out = tiny_vit.encode_image(x)
    assert torch.equal(out, resized(x))
    with pytest.raises((AssertionError, RuntimeError), match="doesn.t match"), tiny_vit.sizes.at((48, 16)):
        tiny_vit.encode_image(torch.randn(1, 3, 32, 32))  # wrong pixels for this size: the forward fails
    assert tiny_vit.model.pos_embed is built and tuple(tiny_vit.model.patch_embed.img_size) == (32, 32)
    assert tiny_vit.sizes._pos_embed((48, 16)) is tiny_vit.sizes._pos_embed((48, 16))  # resampled once


def test_transform_per_size_is_timm_eval_transform(tiny_vit):
    assert tiny_vit.preprocessing((16, 16)) == {"input_size": [16, 16], "resize": 17, "interpolation": "bicubic",
                                                "crop": [16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert tiny_vit.sizes.transform((32, 32)) is tiny_vit.preprocess
