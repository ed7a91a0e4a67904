"""Input sizes of a backbone: the library's eval transform per size, and timm ViTs run at any
size their patch grid allows.

A timm ViT is built at one size (its position grid). ``InputSizes.at(size)`` runs it at another:
the position embeddings are resampled from the built grid once per size (exactly as timm's own
``set_input_size`` resamples them) and cached, then swapped in for the forward and back after.
open_clip models run at their own size only.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable

from torch import nn

from selora.models.catalog import ModelError

MAX_SCALE = 4  # an input side may be at most this many times the built side


class InputSizeError(ModelError):
    """An input size this base cannot run at."""


def timm_eval_transform(model: nn.Module, size: tuple[int, int]) -> Callable:
    """timm's own eval transform for ``model`` at ``size`` (its crop_pct, interpolation, mean, std)."""
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, *size)}, model=model))


def describe_transform(transform) -> dict:
    """What a torchvision ``Compose`` eval transform does: resize (an int: the shorter side),
    interpolation, centre crop, mean and std."""
    out: dict = {}
    for step in getattr(transform, "transforms", ()):
        kind = type(step).__name__
        if kind.startswith("Resize"):
            out["resize"] = step.size if isinstance(step.size, int) else list(step.size)
            out["interpolation"] = getattr(step.interpolation, "value", str(step.interpolation))
        elif kind == "CenterCrop":
            out["crop"] = list(step.size)
        elif kind == "Normalize":
            out["mean"], out["std"] = [float(v) for v in step.mean], [float(v) for v in step.std]
    return out


class InputSizes:
    """The sizes a backbone's vision tower runs at, their transforms and (timm) position grids."""

    def __init__(self, library: str, model: nn.Module, preprocess: Callable, cache_size: int = 16):
        self.library, self.model, self.cache_size = library, model, cache_size
        self.built = _built_size(library, model)
        self._transforms: OrderedDict[tuple[int, int], Callable] = OrderedDict({self.built: preprocess})
        self._pos_embeds: OrderedDict[tuple[int, int], nn.Parameter] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # copies (deepcopy of a backbone) get their own lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def check(self, size) -> tuple[int, int]:
        """``size`` as (H, W) if this base can run at it, else ``InputSizeError`` saying why."""
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise InputSizeError(f"input_size must be [height, width] in pixels, got {size!r}")
        size = (size[0], size[1])
        if size == self.built:
            return size
        if not self.resizable:
            raise InputSizeError(f"input size {list(size)}: this base runs at {list(self.built)} only")
        patch = tuple(self.model.patch_embed.patch_size)
        limit = tuple(MAX_SCALE * b for b in self.built)
        if any(s < p or s % p for s, p in zip(size, patch)) or any(s > m for s, m in zip(size, limit)):
            raise InputSizeError(
                f"input size {list(size)}: this base takes sides that are multiples of its patch {list(patch)}, "
                f"up to {list(limit)}")
        return size

    def tokens(self, size: tuple[int, int]) -> int:
        """Tokens the vision tower processes for one image at ``size``: patches plus prefix tokens."""
        if self.library == "open_clip":
            patch, prefix = self.model.visual.patch_size, 1  # open_clip's ViT: one class token
        else:
            patch, prefix = self.model.patch_embed.patch_size, self.model.num_prefix_tokens
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return prefix + (size[0] // patch[0]) * (size[1] // patch[1])

    @property
    def resizable(self) -> bool:
        return self.library == "timm" and getattr(self.model, "pos_embed", None) is not None and hasattr(self.model, "patch_embed")

    def transform(self, size: tuple[int, int]) -> Callable:
        """The eval transform at ``size`` (called from several decoding threads)."""
        with self._lock:
            if size not in self._transforms:
                self._transforms[self.check(size)] = timm_eval_transform(self.model, size)
                _trim(self._transforms, self.cache_size, keep=self.built)
            self._transforms.move_to_end(size)
            return self._transforms[size]

    @contextlib.contextmanager
    def at(self, size: tuple[int, int]):
        """Run the model at ``size`` inside the block (a no-op at the built size)."""
        if size == self.built:
            yield
            return
        m, pe = self.model, self.model.patch_embed
        pos = self._pos_embed(self.check(size))
        saved = m.pos_embed, (pe.img_size, pe.grid_size, pe.num_patches)
        m.pos_embed = pos
        pe.img_size, pe.grid_size, pe.num_patches = pe._init_img_size(size)
        try:
            yield
        finally:
            m.pos_embed = saved[0]
            pe.img_size, pe.grid_size, pe.num_patches = saved[1]

    def _pos_embed(self, size: tuple[int, int]) -> nn.Parameter:
        if size not in self._pos_embeds:
            from timm.layers import resample_abs_pos_embed

            m = self.model
            grid = tuple(s // p for s, p in zip(size, m.patch_embed.patch_size))
            prefix = 0 if getattr(m, "no_embed_class", False) else m.num_prefix_tokens
            resampled = resample_abs_pos_embed(m.pos_embed.detach(), new_size=grid, old_size=m.patch_embed.grid_size,
                                               num_prefix_tokens=prefix)  # as timm's set_input_size does
            self._pos_embeds[size] = nn.Parameter(resampled, requires_grad=False)
            _trim(self._pos_embeds, self.cache_size)
        self._pos_embeds.move_to_end(size)
        return self._pos_embeds[size]


def _built_size(library: str, model: nn.Module) -> tuple[int, int]:
    size = model.visual.image_size if library == "open_clip" else model.patch_embed.img_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _trim(cache: OrderedDict, limit: int, keep=None) -> None:
    for key in list(cache):
        if len(cache) <= limit:
            break
        if key != keep:
            del cache[key]
