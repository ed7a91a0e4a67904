"""Adapter registry: disk (the adapter root) -> host cache -> device cache.

Every adapter the server knows is an ``AdapterRecord``: its name, its directory under the
adapter root and, when resident, its validated ``SparseAdapter`` (host cache) and its
``DeviceAdapter`` (device cache). Each cache is an LRU with a byte budget counted from the
adapters' actual active blocks (``SparseAdapter.nbytes`` / ``DeviceAdapter.nbytes``), so a sparse
adapter costs what it stores, not what a dense one would. An evicted adapter is reloaded from
its directory on demand.

Safety rules:
- a new adapter is read and validated against the base's block table before anything is
  evicted; a failed load or upload leaves the registry exactly as it was;
- a request *pins* the record it names (and its host copy) until its batch is done; pinned
  records are never evicted, and replacing or deleting a name only unregisters the old record,
  so in-flight requests keep working on the object they hold;
- names are ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``; paths are resolved inside the adapter root
  (no ``..``, no symlink pointing outside); uploads are written to a temporary directory under
  the root and renamed into place.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from selora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, SparseAdapter, load_adapter, parse_adapter
from selora.models.factory import Backbone
from selora.runtime.batch import DeviceAdapter, to_device

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = ("base",)


class RegistryError(Exception):
    """Base of the registry's own errors (adapter file problems are ``AdapterError``)."""


class InvalidAdapterNameError(RegistryError):
    pass


class UnsafePathError(RegistryError):
    pass


class UnknownAdapterError(RegistryError):
    pass


class AdapterTooLargeError(RegistryError):
    pass


@dataclass(eq=False)
class AdapterRecord:
    """One registered version of an adapter. Replaced names get a new record."""

    name: str
    path: Path
    info: dict  # what GET /v1/adapters/{name} reports besides residency
    host_nbytes: int
    sparse: SparseAdapter | None = None
    device: DeviceAdapter | None = None
    pins: int = 0
    serial: int = field(default_factory=itertools.count().__next__)

    @property
    def device_nbytes(self) -> int:
        return self.device.nbytes if self.device is not None else 0


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES or name.startswith(".."):
        raise InvalidAdapterNameError(
            f"invalid adapter name {name!r}: use 1-64 characters [A-Za-z0-9._-], starting with a letter or digit, not 'base'"
        )
    return name


class LRUCache:
    """Names in least-recently-used order with a byte budget (the values live on the records)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sizes: OrderedDict[int, int] = OrderedDict()  # record serial -> bytes

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def touch(self, serial: int, nbytes: int) -> None:
        self.sizes[serial] = nbytes
        self.sizes.move_to_end(serial)

    def drop(self, serial: int) -> None:
        self.sizes.pop(serial, None)

    def victims(self, extra: int, pinned: Callable[[int], bool]) -> list[int]:
        """Least-recently-used unpinned serials to evict so that ``extra`` more bytes fit."""
        over, out = self.nbytes + extra - self.budget, []
        for serial, size in self.sizes.items():
            if over <= 0:
                break
            if not pinned(serial):
                out.append(serial)
                over -= size
        return out


class AdapterRegistry:
    def __init__(self, backbone: Backbone, root: str | Path, host_budget: int, device_budget: int, listener: Callable[[str, str], None] | None = None):
        self.backbone = backbone
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = LRUCache(host_budget)
        self.device = LRUCache(device_budget)
        self.records: dict[str, AdapterRecord] = {}
        self._by_serial: dict[int, AdapterRecord] = {}  # every record still cached (current or pinned)
        self._lock = threading.RLock()
        self.listener = listener or (lambda event, tier: None)

    # -- paths --------------------------------------------------------------------------
    def resolve_path(self, path: str) -> Path:
        """``path`` relative to the adapter root, checked to stay inside it (symlinks resolved)."""
        if not isinstance(path, str) or not path or os.path.isabs(path) or ".." in Path(path).parts:
            raise UnsafePathError(f"adapter path {path!r} must be relative to the adapter root, without '..'")
        resolved = (self.root / path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UnsafePathError(f"adapter path {path!r} leaves the adapter root")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            f = resolved / name
            if f.exists() and self.root not in f.resolve().parents:
                raise UnsafePathError(f"{path}/{name} is a link that leaves the adapter root")
        return resolved

    # -- registering --------------------------------------------------------------------
    def preload(self) -> list[str]:
        """Register every adapter directory under the root; a bad one is logged and skipped."""
        loaded = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.load(d.name, d.name)
                loaded.append(d.name)
            except (AdapterError, RegistryError) as e:
                log.warning("skipping adapter directory %s: %s", d, e)
        return loaded

    def load(self, name: str, path: str) -> AdapterRecord:
        """Register (or atomically replace) ``name`` from ``path`` under the adapter root."""
        validate_name(name)
        directory = self.resolve_path(path)
        adapter = load_adapter(directory, self.backbone.blocks)
        return self._register(name, directory, adapter)

    def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes) -> AdapterRecord:
        """Validate the two files, write them atomically to ``<root>/<name>``, register them."""
        validate_name(name)
        adapter = parse_adapter(config_bytes, weights_bytes, self.backbone.blocks)
        self._check_fits(adapter)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".upload-{name}-"))
        try:
            (staging / CONFIG_NAME).write_bytes(config_bytes)
            (staging / WEIGHTS_NAME).write_bytes(weights_bytes)
            with self._lock:
                target = self.root / name
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    raise UnsafePathError(f"{target.name} under the adapter root is not a plain directory")
                old = None
                if target.exists():
                    old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".replaced-{name}-"))
                    os.replace(target, old / "adapter")
                try:
                    os.replace(staging, target)
                except OSError:
                    if old is not None:
                        os.replace(old / "adapter", target)
                    raise
                record = self._register(name, target, adapter)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_fits(self, adapter: SparseAdapter) -> None:
        if adapter.nbytes > self.host.budget:
            raise AdapterTooLargeError(f"adapter needs {adapter.nbytes} bytes, more than the host cache budget {self.host.budget}")

    def _register(self, name: str, directory: Path, adapter: SparseAdapter) -> AdapterRecord:
        self._check_fits(adapter)
        info = {
            "variant": adapter.variant,
            "r": adapter.r,
            "lora_alpha": adapter.lora_alpha,
            "active_blocks": list(adapter.blocks),
            "num_blocks": len(self.backbone.blocks),
            "bytes": adapter.nbytes,
            "head_classes": adapter.head_classes,
            "head_input": adapter.head_input if adapter.head_classes else None,
            "base_model": adapter.base_model,
        }
        record = AdapterRecord(name, directory, info, adapter.nbytes, sparse=adapter)
        with self._lock:  # everything above could fail; nothing below can
            old = self.records.get(name)
            self.records[name] = record
            self._by_serial[record.serial] = record
            if old is not None:
                self._retire(old)
            self._make_room(self.host, record.host_nbytes, "host")
            self.host.touch(record.serial, record.host_nbytes)
        self.listener("load", "host")
        log.info("adapter %s: %d active blocks, %d bytes, from %s", name, len(adapter.blocks), adapter.nbytes, directory)
        return record

    def delete(self, name: str) -> None:
        """Unregister ``name`` (its files stay on disk); in-flight requests finish normally."""
        with self._lock:
            record = self.records.pop(name, None)
            if record is None:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            self._retire(record)

    def _retire(self, record: AdapterRecord) -> None:
        """An unregistered record leaves the caches once no request pins it."""
        if record.pins == 0:
            self._forget(record)

    def _forget(self, record: AdapterRecord) -> None:
        self.host.drop(record.serial)
        self.device.drop(record.serial)
        self._by_serial.pop(record.serial, None)
        record.sparse = record.device = None

    # -- serving ------------------------------------------------------------------------
    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self.records.get(name)
        if record is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return record

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.records)

    def describe(self, record: AdapterRecord) -> dict:
        with self._lock:
            return {
                "name": record.name,
                **record.info,
                "resident_host": record.sparse is not None,
                "resident_device": record.device is not None,
                "device_bytes": record.device_nbytes,
            }

    def pin(self, name: str) -> AdapterRecord:
        """Take the current record of ``name`` for one request, with its host copy loaded."""
        with self._lock:
            record = self.get(name)
            record.pins += 1
            try:
                if record.device is None:
                    self._ensure_host(record)
            except BaseException:
                self._unpin_locked(record)
                raise
            return record

    def unpin(self, record: AdapterRecord) -> None:
        with self._lock:
            self._unpin_locked(record)

    def _unpin_locked(self, record: AdapterRecord) -> None:
        record.pins -= 1
        if record.pins == 0 and self.records.get(record.name) is not record:
            self._forget(record)

    def device_adapters(self, records: list[AdapterRecord]) -> list[DeviceAdapter]:
        """Device copies of pinned records (uploaded on demand); the list keeps them alive."""
        with self._lock:
            out = []
            for record in records:
                if record.device is None:
                    self._ensure_host(record)
                    dev = to_device(record.sparse, self.backbone)
                    self._make_room(self.device, dev.nbytes, "device")
                    record.device = dev
                    self.listener("load", "device")
                self.device.touch(record.serial, record.device.nbytes)
                out.append(record.device)
            return out

    def _ensure_host(self, record: AdapterRecord) -> None:
        if record.sparse is None:
            adapter = load_adapter(record.path, self.backbone.blocks)
            self._make_room(self.host, adapter.nbytes, "host")
            record.sparse = adapter
            self.listener("load", "host")
        self.host.touch(record.serial, record.host_nbytes)

    def _make_room(self, cache: LRUCache, nbytes: int, tier: str) -> None:
        def pinned(serial: int) -> bool:
            r = self._by_serial.get(serial)
            return r is not None and r.pins > 0

        for serial in cache.victims(nbytes, pinned):
            cache.drop(serial)
            record = self._by_serial.get(serial)
            if record is not None:
                if tier == "host":
                    record.sparse = None
                else:
                    record.device = None
            self.listener("evict", tier)

    # -- metrics ------------------------------------------------------------------------
    def resident(self) -> dict[str, tuple[int, int]]:
        """Per tier: (adapters resident, bytes resident)."""
        with self._lock:
            return {"host": (len(self.host.sizes), self.host.nbytes), "device": (len(self.device.sizes), self.device.nbytes)}
