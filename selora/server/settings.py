"""Every server setting, read in this one place: defaults < ``SELORA_*`` environment < CLI flags.

Each field's environment variable is ``SELORA_`` + its upper-case name (``SELORA_PORT``,
``SELORA_STORE``, ...); its flag is ``--`` + its name with dashes (``--import-root``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Mapping

from selora.models.catalog import DEFAULT_MODEL, has_random_weights, list_models

if TYPE_CHECKING:  # torch is imported where it is used: `selora serve --help` never imports it
    import torch

    from selora.kernels.config import KernelConfig
    from selora.runtime.inputs import Limits

MiB = 1 << 20


class SettingsError(ValueError):
    """A setting that cannot be honoured on this machine; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL  # dinov2-small | open_clip:<config> | timm:<name> | a named config
    weights: str | None = None  # open_clip pretrained tag or local safetensors file
    device: str = "auto"  # auto (cuda if visible, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    store: str = "selora-store"  # the durable store: SQLite manifest, keys, tenants, adapter blobs
    import_root: str = "adapters"  # adapter directories admins may copy into the store (imported once at first start)
    host: str = "127.0.0.1"
    cors_origins: str = ""  # comma-separated browser origins allowed to call the API; any other Origin gets 403
    allow_unauthenticated: bool = False  # bind a non-loopback address although the store holds no API key
    port: int = 8000
    max_batch_size: int = 32  # rows (images or texts) per forward
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for its batch to fill
    max_queue: int = 512  # rows waiting; beyond it requests get 429 + Retry-After
    host_cache_mb: float = 1024.0  # host-memory budget of resident adapters (active blocks)
    device_cache_mb: float = 512.0  # device-memory budget of resident adapters (their slot buffers)
    kernel: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | triton | torch
    base_gemm: str | None = None  # fused | library (default: the GPU's tuning data)
    split_shrink_rank: int | None = None  # larger block ranks use the split shrink (default: tuning data)
    cuda_graphs: bool = False  # replay captured forwards per batch-size bucket (CUDA + Triton only; unmeasured: off)
    max_body_mb: float = 32.0  # request body size (413 beyond)
    max_inputs: int = 64  # inputs per request (413 beyond)
    max_image_pixels: int = 4096 * 4096  # decoded image width x height (413 beyond)
    max_text_chars: int = 2048  # characters per text (413 beyond)
    max_image_aspect: float = 16.0  # long side / short side of one image (413 beyond)
    max_request_pixels: int = 4 * 4096 * 4096  # decoded pixels of all images of one request (413 beyond)
    ray: bool = False  # serve on Ray Serve: an ingress and engine replicas (extra [ray])
    replicas: int = 2  # engine replicas with --ray
    autoscale: str = ""  # MIN:MAX engine replicas with --ray, instead of a fixed number
    ray_address: str = ""  # join this Ray cluster with --ray (default: start a local one)

    @property
    def limits(self) -> Limits:
        from selora.runtime.inputs import Limits

        return Limits(self.max_inputs, self.max_image_pixels, self.max_text_chars, self.max_image_aspect, self.max_request_pixels)

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MiB)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError(f"device {self.device!r} asked for, but no CUDA GPU is visible")
        if device.type not in ("cpu", "cuda"):
            raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return device

    def torch_dtype(self) -> torch.dtype:
        import torch

        from selora.models.factory import DTYPES

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]

    def kernel_config(self) -> KernelConfig:
        from selora.kernels.config import KernelConfig, KernelConfigError

        """The kernel configuration, resolved once at start-up; refused here if it cannot run."""
        try:
            config = KernelConfig.resolve(self.torch_device(), self.kernel, self.base_gemm, self.split_shrink_rank)
        except KernelConfigError as e:
            raise SettingsError(str(e)) from None
        if self.cuda_graphs and config.backend != "triton":
            raise SettingsError(f"--cuda-graphs needs a CUDA GPU and the compiled Triton kernel; this server would run the "
                                f"{config.backend} backend on {self.torch_device()}")
        return config

    @classmethod
    def load(cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = getattr(args, f.name, None) if args is not None else None
            if raw is None:
                raw = env.get(f"SELORA_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _convert(f, raw)
        return cls(**values)


def _boolean(raw) -> bool:
    text = str(raw).lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise ValueError(raw)


def _convert(f, raw):
    kind = {"int": int, "float": float, "bool": _boolean}.get(str(f.type).split(" ")[0], str)
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"selora serve: {f.name} must be {kind.__name__.strip('_')}, got {raw!r}") from None


HELP = {
    "model": "base model: a named model ({named}), open_clip:<config> or timm:<name>",
    "weights": "open_clip pretrained tag or local .safetensors file",
    "device": "where the base model runs: auto (cuda if visible, else cpu), cpu, cuda or cuda:N",
    "dtype": "its weights' dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16",
    "store": "store directory (SQLite manifest, API keys, tenants, adapter blobs); created if missing",
    "import_root": "directory of adapter directories: imported into the store once at first start; "
                   "admins may copy more from it with POST /v1/adapters {name, path}",
    "host": "address to bind",
    "cors_origins": "comma-separated browser origins allowed to call the API (any other Origin: 403)",
    "allow_unauthenticated": "bind a non-loopback address although the store holds no API key",
    "port": "port to bind",
    "max_batch_size": "rows (images or texts) per forward",
    "max_wait_ms": "how long the oldest queued request waits for its batch to fill",
    "max_queue": "rows allowed to wait; beyond it 429 with Retry-After",
    "host_cache_mb": "host-memory budget of resident adapters (their active blocks)",
    "device_cache_mb": "device-memory budget of resident adapters: sizes their slot buffers, allocated at start",
    "kernel": "adapted-layer backend: auto (Triton on CUDA, torch elsewhere), triton (on CPU: Triton's interpreter) or torch",
    "base_gemm": "where the Triton path runs x·W0ᵀ: fused (in the kernel) or library (torch's GEMM first)",
    "split_shrink_rank": "block ranks above this use the split (two-launch) shrink",
    "cuda_graphs": "capture the forward once per batch-size bucket at start-up and replay it (CUDA and Triton only; "
                   "not yet measured on a GPU, so off by default)",
    "max_body_mb": "request body size limit (413)",
    "max_inputs": "inputs per request (413)",
    "max_image_pixels": "pixels of one decoded image (413)",
    "max_text_chars": "characters of one text (413)",
    "max_image_aspect": "long side / short side of one image (413)",
    "max_request_pixels": "decoded pixels of all images of one request (413)",
    "ray": "serve on Ray Serve: one ingress (this API) and engine replicas sharing the store (pip install 'selora[ray]')",
    "replicas": "engine replicas with --ray (each loads the base model)",
    "autoscale": "MIN:MAX engine replicas with --ray, scaled by Ray Serve on load (instead of --replicas)",
    "ray_address": "Ray cluster to join with --ray (default: start a local Ray instance)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags fall back to the environment, then the default."""
    named = ", ".join(f"{m} (random weights)" if has_random_weights(m) else m for m in list_models())
    for f in fields(Settings):
        flag, env_help = f"--{f.name.replace('_', '-')}", f"env SELORA_{f.name.upper()}"
        text = HELP[f.name].replace("{named}", named)
        if str(f.type) == "bool":
            parser.add_argument(flag, action="store_const", const=True, default=None, help=f"{text} ({env_help})")
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(), help=f"{text} ({env_help}; default {f.default})")
