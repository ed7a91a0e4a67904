"""Adapter registry: the store (SQLite manifest + immutable blobs) -> host cache -> device slots.

Every committed adapter version is an ``AdapterRecord`` keyed by ``(tenant, name, version)``:
its manifest entry and, when resident, its validated ``SparseAdapter`` (host cache) and its
``DeviceAdapter`` (device tier). The host cache is an LRU keyed the same way, with a byte budget
counted from the adapters' actual active blocks (``SparseAdapter.nbytes``). The device tier is
``DeviceSlots`` sized from the device budget: a resident adapter holds slot pages for its active
blocks only, and the least recently used unpinned adapters give theirs up when a new one finds
no free run. An evicted adapter is reloaded from its content-addressed blob, whose hash is
checked, so a record can only ever serve its own version's bytes.

Adapters are addressed ``tenant/name`` (``address()``); who may address what is the server's
business (``selora.server.auth``), not the registry's.

Safety rules:
- a new adapter is read and validated against the base's block table before anything is
  evicted or stored; a failed load or upload leaves the registry and the store as they were;
- writes are serialized: store commit and registry swap happen together, in commit order;
- a request *pins* the record it names (and its host copy) until its batch is done; pinned
  records are never evicted (so no slot a running batch reads is ever freed or rewritten), and
  replacing or deleting an adapter only unregisters the old record, so in-flight requests finish
  on the version they pinned;
- names are ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``; import paths are resolved inside the import
  root (no ``..``, no symlink pointing outside) and the files are copied into the store.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selora.adapters.format import (
    CONFIG_NAME, WEIGHTS_NAME, AdapterError, AdapterNotFoundError, ServingTarget, SparseAdapter, parse_adapter,
)
from selora.adapters.peft import as_selora_files
from selora.models.blocks import BlockTable
from selora.models.factory import Backbone
from selora.models.resolution import InputSizeError
from selora.runtime.paths import UnsafePathError, resolve_inside
from selora.runtime.slots import DeviceAdapter, DeviceSlots, DeviceSlotsFullError
from selora.runtime.store import AdapterStore, Entry, StoreError, valid_name

log = logging.getLogger(__name__)

Key = tuple[str, str, int]  # (tenant, name, version)


class RegistryError(Exception):
    """Base of the registry's own errors (adapter file problems are ``AdapterError``)."""


class InvalidAdapterNameError(RegistryError):
    pass


class UnknownAdapterError(RegistryError):
    pass


class AdapterTooLargeError(RegistryError):
    pass


class UnsupportedInputSizeError(RegistryError):
    """The adapter was trained at an input size this base cannot run at."""


@dataclass(eq=False)
class AdapterRecord:
    """One committed version of an adapter. A replacement is a new record with a new version."""

    entry: Entry
    host_nbytes: int
    sparse: SparseAdapter | None = None
    device: DeviceAdapter | None = None
    pins: int = 0

    @property
    def key(self) -> Key:
        return (self.entry.tenant, self.entry.name, self.entry.version)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def tenant(self) -> str:
        return self.entry.tenant

    @property
    def address(self) -> str:
        return address(self.entry.tenant, self.entry.name)

    @property
    def device_nbytes(self) -> int:
        return self.device.nbytes if self.device is not None else 0


def address(tenant: str, name: str) -> str:
    return f"{tenant}/{name}"


def validate_name(name: str, what: str = "adapter name") -> str:
    if not valid_name(name):
        raise InvalidAdapterNameError(
            f"invalid {what} {name!r}: use 1-64 characters [A-Za-z0-9._-], starting with a letter or digit, not 'base'"
        )
    return name


def adapter_info(adapter: SparseAdapter) -> dict:
    """What the manifest keeps about a validated adapter (and the API reports)."""
    return {
        "variant": adapter.variant,
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "active_blocks": list(adapter.blocks),
        "bytes": adapter.nbytes,
        "head_classes": adapter.head_classes,
        "head_input": adapter.head_input if adapter.head_classes else None,
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "input_size": None if adapter.input_size is None else list(adapter.input_size),  # None: the base's size
    }


def read_adapter_dir(root: Path, path: str) -> tuple[bytes, bytes]:
    """The two files of the adapter directory ``path`` under ``root``; messages name ``path`` only."""
    directory = resolve_inside(root, path, (CONFIG_NAME, WEIGHTS_NAME))
    files = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise AdapterNotFoundError(f"{path}: {name} is missing under the import root")
        files.append((directory / name).read_bytes())
    return files[0], files[1]


def import_tree(store: AdapterStore, root: str | Path, tenant: str, table: BlockTable | None = None,
                serving: ServingTarget | None = None) -> list[str]:
    """Copy every valid adapter directory under ``root`` into the store as ``tenant/<dir name>``
    (validated against ``table`` and, when given, proven to serve on ``serving``); a bad one is
    logged and skipped. Returns the names imported."""
    root, imported = Path(root).resolve(), []
    validate_name(tenant, "tenant name")
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            validate_name(d.name)
            config, weights = read_adapter_dir(root, d.name)
            adapter = parse_adapter(config, weights, table, serving)
            store.put_adapter(tenant, d.name, config, weights, adapter_info(adapter))
            imported.append(d.name)
        except (AdapterError, RegistryError, UnsafePathError, StoreError) as e:
            log.warning("not importing adapter directory %s: %s", d.name, e)
    return imported


class LRUCache:
    """Record keys in least-recently-used order with a byte budget (the values live on the records)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sizes: OrderedDict[Key, int] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def touch(self, key: Key, nbytes: int) -> None:
        self.sizes[key] = nbytes
        self.sizes.move_to_end(key)

    def drop(self, key: Key) -> None:
        self.sizes.pop(key, None)

    def victims(self, extra: int, pinned: Callable[[Key], bool]) -> list[Key]:
        """Least-recently-used unpinned keys to evict so that ``extra`` more bytes fit."""
        over, out = self.nbytes + extra - self.budget, []
        for key, size in self.sizes.items():
            if over <= 0:
                break
            if not pinned(key):
                out.append(key)
                over -= size
        return out


class AdapterRegistry:
    def __init__(self, backbone: Backbone, store: AdapterStore, host_budget: int, device_budget: int,
                 listener: Callable[[str, str], None] | None = None, import_root: str | Path | None = None):
        self.backbone = backbone
        self.serving = ServingTarget.of(backbone)  # every adapter is proven to serve on it before it registers
        self.store = store
        self.import_root = Path(import_root).resolve() if import_root is not None else None
        self.host = LRUCache(host_budget)
        self.slots = DeviceSlots.from_budget(backbone, device_budget)
        self.device = LRUCache(self.slots.nbytes)  # its order decides eviction; free slot pages decide room
        self.records: dict[tuple[str, str], AdapterRecord] = {}  # (tenant, name) -> current version
        self._by_key: dict[Key, AdapterRecord] = {}  # every record still cached (current or pinned)
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()  # store commit + registry swap, one writer at a time
        self._not_served: set[tuple[str, str, int]] = set()  # stored versions skipped (warned once)
        self._seen_change: int | None = None  # the store's change log, read up to here (None: nothing read)
        self.listener = listener or (lambda event, tier: None)

    # -- registering --------------------------------------------------------------------
    def preload(self) -> list[str]:
        """Register every committed adapter for this base; host copies are loaded (and their
        blobs checked) while they fit the host budget, the rest on first use."""
        loaded = []
        self._seen_change = self.store.last_change()  # what the store holds now is at least this
        for entry in self.store.entries():
            name = address(entry.tenant, entry.name)
            if not self._servable(entry):
                continue
            record = AdapterRecord(entry, entry.info["bytes"])
            with self._lock:
                if self.host.nbytes + record.host_nbytes <= self.host.budget:
                    try:
                        self._ensure_host(record)
                    except (AdapterError, StoreError, OSError) as e:
                        log.error("adapter %s v%d cannot be read from the store: %s", name, entry.version, e)
                        continue
                self.records[(entry.tenant, entry.name)] = record
                self._by_key[record.key] = record
            loaded.append(name)
        return loaded

    def refresh(self) -> None:
        """Catch up with what other connections committed to the store since this registry last
        looked (``selora store import`` while serving, a second server): register new and newer
        versions this server can serve, drop adapters the store no longer holds. Every lookup
        calls it: when nothing changed it costs one indexed SQLite read; otherwise it reads the
        rows of the adapters that changed (the whole manifest only on a first call or when the
        store's change log no longer reaches back)."""
        if self.store.last_change() == self._seen_change:
            return
        with self._write_lock:  # no upload or delete of this process in between
            latest, changed = self.store.changes_since(self._seen_change)
            if latest == self._seen_change:  # another thread caught up meanwhile
                return
            if changed is None:
                entries = {(e.tenant, e.name): e for e in self.store.entries()}
            else:
                entries = {key: self.store.entry(*key) for key in changed}
            with self._lock:
                if changed is None:  # registered but no longer stored: deleted
                    entries = {**dict.fromkeys(self.records), **entries}
                for key, entry in entries.items():
                    self._sync(key, entry)
            self._seen_change = latest

    def _sync(self, key: tuple[str, str], entry) -> None:
        """Make ``key``'s registration follow the store's ``entry`` (None: deleted)."""
        current = self.records.get(key)
        if entry is None:
            if current is not None:
                self._retire(self.records.pop(key))
            return
        if current is not None and current.entry.version >= entry.version:
            return
        if not self._servable(entry):  # the name now holds a version this server cannot serve
            if current is not None:  # a replaced version is never served again
                self._retire(self.records.pop(key))
            return
        record = AdapterRecord(entry, entry.info["bytes"])
        self.records[key] = record
        self._by_key[record.key] = record
        if current is not None:
            self._retire(current)
        log.info("adapter %s v%d registered from the store", record.address, entry.version)

    def _servable(self, entry) -> bool:
        """False, with one warning per stored version, for what ``_unservable`` refuses."""
        why = self._unservable(entry)
        if why is not None and (entry.tenant, entry.name, entry.version) not in self._not_served:
            self._not_served.add((entry.tenant, entry.name, entry.version))
            log.warning("adapter %s v%d is not served: %s", address(entry.tenant, entry.name), entry.version, why)
        return why is None

    def _unservable(self, entry) -> str | None:
        """Why a stored adapter cannot serve on this server (None: it can). Uploads are checked
        before they commit; this catches what ``selora store import`` (no model loaded) or a
        server with another base or smaller budgets left in the store."""
        info = entry.info
        if info.get("base_fingerprint") != self.backbone.fingerprint:
            return f"it is for another base ({info.get('base_model')})"
        if info["bytes"] > self.host.budget:
            return f"it needs {info['bytes']} bytes, more than the host cache budget {self.host.budget}"
        if info.get("input_size") is not None:
            try:
                self.backbone.sizes.check(info["input_size"])
            except InputSizeError as e:
                return f"trained at {info['input_size']} px: {e}"
        return None

    def import_dir(self, tenant: str, name: str, path: str) -> AdapterRecord:
        """Copy the adapter directory ``path`` under the import root into the store as ``tenant/name``."""
        validate_name(name)
        if self.import_root is None:
            raise UnsafePathError("this server has no import root")
        config, weights = read_adapter_dir(self.import_root, path)
        return self.put(tenant, name, config, weights)

    def put(self, tenant: str, name: str, config_bytes: bytes, weights_bytes: bytes) -> AdapterRecord:
        """Validate the two files, commit them to the store as ``tenant/name`` (replacing any
        previous version) and register the new version."""
        validate_name(tenant, "tenant name")
        validate_name(name)
        config_bytes, weights_bytes = as_selora_files(config_bytes, weights_bytes, self.backbone)  # PEFT: converted
        adapter = parse_adapter(config_bytes, weights_bytes, self.backbone.blocks, self.serving)
        self._check_fits(adapter)
        with self._write_lock:
            entry, _ = self.store.put_adapter(tenant, name, config_bytes, weights_bytes, adapter_info(adapter))
            record = AdapterRecord(entry, adapter.nbytes, sparse=adapter)
            with self._lock:  # everything above could fail; nothing below can
                old = self.records.get((tenant, name))
                self.records[(tenant, name)] = record
                self._by_key[record.key] = record
                if old is not None:
                    self._retire(old)
                self._make_host_room(record.host_nbytes)
                self.host.touch(record.key, record.host_nbytes)
        self.listener("load", "host")
        log.info("adapter %s v%d: %d active blocks, %d bytes", record.address, entry.version, len(adapter.blocks), adapter.nbytes)
        return record

    def _check_fits(self, adapter: SparseAdapter) -> None:
        if adapter.nbytes > self.host.budget:
            raise AdapterTooLargeError(f"adapter needs {adapter.nbytes} bytes, more than the host cache budget {self.host.budget}")
        if adapter.input_size is not None:
            try:
                self.backbone.sizes.check(adapter.input_size)
            except InputSizeError as e:
                raise UnsupportedInputSizeError(f"adapter trained at {list(adapter.input_size)} px: {e}") from None
        why = self.slots.fits_empty(adapter)
        if why is not None:
            raise AdapterTooLargeError(f"adapter does not fit the device: {why}")

    def delete(self, tenant: str, name: str) -> None:
        """Delete ``tenant/name`` from the store and unregister it; in-flight requests finish normally."""
        with self._write_lock:
            if self.store.delete_adapter(tenant, name) is None:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            with self._lock:
                record = self.records.pop((tenant, name), None)
                if record is not None:
                    self._retire(record)

    def _retire(self, record: AdapterRecord) -> None:
        """An unregistered record leaves the caches once no request pins it."""
        if record.pins == 0:
            self._forget(record)

    def _forget(self, record: AdapterRecord) -> None:
        self.host.drop(record.key)
        self._drop_device(record)
        self._by_key.pop(record.key, None)
        record.sparse = None

    # -- serving ------------------------------------------------------------------------
    def get(self, adapter: str) -> AdapterRecord:
        """The current record of the address ``tenant/name``."""
        self.refresh()
        return self.lookup(adapter)

    def lookup(self, adapter: str) -> AdapterRecord:
        """``get`` without asking the store first: what is registered now (labels of a request
        already served, and ``pin`` after its own refresh)."""
        tenant, _, name = adapter.partition("/")
        with self._lock:
            record = self.records.get((tenant, name))
        if record is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return record

    def current(self) -> list[AdapterRecord]:
        """Every registered record (current versions), ordered by tenant and name."""
        self.refresh()
        with self._lock:
            return [self.records[k] for k in sorted(self.records)]

    def describe(self, record: AdapterRecord) -> dict:
        with self._lock:
            info = {k: v for k, v in record.entry.info.items() if k != "base_fingerprint"}
            return {
                "name": record.name,
                "tenant": record.tenant,
                "version": record.entry.version,
                "content_hash": record.entry.sha256,
                "stored_bytes": record.entry.bytes,
                **info,
                "num_blocks": len(self.backbone.blocks),
                "resident_host": record.sparse is not None,
                "resident_device": record.device is not None,
                "device_bytes": record.device_nbytes,
            }

    def pin(self, adapter: str) -> AdapterRecord:
        """Take the current record of ``tenant/name`` for one request, with its host copy loaded."""
        self.refresh()  # outside the lock: it takes the write lock first, as uploads do
        with self._lock:
            record = self.lookup(adapter)
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
        if record.pins == 0 and self.records.get((record.tenant, record.name)) is not record:
            self._forget(record)

    def device_adapters(self, records: list[AdapterRecord]) -> list[DeviceAdapter]:
        """The records' resident forms, written into device slots on demand (the caller pins them)."""
        with self._lock:
            out = []
            batch = {r.key for r in records}
            for record in records:
                self.listener("miss" if record.device is None else "hit", "device")
                if record.device is None:
                    self._ensure_host(record)
                    prepared = self.slots.prepare(record.sparse)  # everything that can fail, before evicting
                    while record.device is None:
                        try:
                            record.device = self.slots.place(record.sparse, prepared)
                        except DeviceSlotsFullError:
                            self._evict_device(batch)
                    self.listener("load", "device")
                self.device.touch(record.key, record.device.nbytes)
                out.append(record.device)
            return out

    def _evict_device(self, keep: set[Key]) -> None:
        """Give the least recently used unpinned adapter's slots back (never one in ``keep``)."""
        for key in self.device.sizes:
            record = self._by_key.get(key)
            if key not in keep and (record is None or record.pins == 0):
                if record is not None:
                    self._drop_device(record)
                else:
                    self.device.drop(key)
                self.listener("evict", "device")
                return
        raise DeviceSlotsFullError("every adapter holding device slots is in use; retry when a batch finishes")

    def _drop_device(self, record: AdapterRecord) -> None:
        self.device.drop(record.key)
        if record.device is not None:
            self.slots.release(record.device)
            record.device = None

    def _ensure_host(self, record: AdapterRecord) -> None:
        self.listener("miss" if record.sparse is None else "hit", "host")
        if record.sparse is None:
            adapter = parse_adapter(record.entry.config, self.store.read_blob(record.entry.sha256), self.backbone.blocks, self.serving)
            self._make_host_room(adapter.nbytes)
            record.sparse = adapter
            self.listener("load", "host")
        self.host.touch(record.key, record.host_nbytes)

    def _make_host_room(self, nbytes: int) -> None:
        def pinned(key: Key) -> bool:
            r = self._by_key.get(key)
            return r is not None and r.pins > 0

        for key in self.host.victims(nbytes, pinned):
            self.host.drop(key)
            record = self._by_key.get(key)
            if record is not None:
                record.sparse = None
            self.listener("evict", "host")

    # -- metrics ------------------------------------------------------------------------
    def resident(self) -> dict[str, tuple[int, int]]:
        """Per tier: (adapters resident, bytes resident)."""
        with self._lock:
            return {"host": (len(self.host.sizes), self.host.nbytes), "device": (len(self.device.sizes), self.device.nbytes)}
