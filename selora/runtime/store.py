"""The durable store: one SQLite database (tenants, API keys, the adapter manifest) and a folder
of immutable, content-addressed weight blobs.

Layout of ``DIR``: ``selora.db`` (WAL mode, ``synchronous=FULL``: a commit that returned is on
disk, also after a power loss) and ``blobs/<sha256>``, one file per distinct
``adapter_model.safetensors``. The adapter config is small and lives in the manifest row.

Write order of an upload, inside one write transaction (``BEGIN IMMEDIATE``: SQLite's write
lock, held across processes): the blob is written to ``blobs/.tmp-*``, fsynced, renamed to its
hash and the folder fsynced; the tenant's quotas are checked and the manifest row swapped;
commit. A crash before the commit leaves an unreferenced blob or a temp file, which
``recover()`` removes; a crash after it leaves the new version. A replaced or deleted version's
blob is removed once no row references it. Every blob removal, ``recover()``'s included, runs
under the same write lock, so no process ever sees another live one between its blob write and
its commit: a replica starting (and recovering) while another uploads, or a killed server still
finishing a commit, cannot remove a blob that is about to be referenced. Versions come from an
AUTOINCREMENT key, so ``(tenant, name, version)`` names one set of bytes forever.

Every put and delete also appends ``(tenant, name)`` to the ``changes`` log in its transaction.
SQLite has one writer at a time, so the log's numbers follow commit order and have no gaps: a
process serving from the store (another server, a Ray replica) catches up on what others
committed by reading the rows past the last number it saw, not the whole manifest. The last
``CHANGE_LOG_ROWS`` rows are kept; a reader that fell further behind reads everything once.

API keys: ``sk-selora-`` + 43 url-safe characters (32 random bytes); only their SHA-256 is
stored, and lookups compare digests in constant time. A store that has ever held a key
(revoked ones included) requires one on every request.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DB_NAME = "selora.db"
BLOBS = "blobs"
TMP_PREFIX = ".tmp-"
KEY_PREFIX = "sk-selora-"
DEFAULT_TENANT = "default"
SHARED_TENANT = "shared"  # adapters every tenant may use; only admins change them
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # tenant and adapter names
RESERVED_NAMES = ("base",)
CHANGE_LOG_ROWS = 10_000  # puts and deletes kept in the change log


def valid_name(name) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and name not in RESERVED_NAMES

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    max_adapters INTEGER,            -- NULL: unlimited
    max_bytes INTEGER,               -- stored bytes (config + weights) of its adapters
    rate_per_s REAL,                 -- token bucket refill; NULL: unlimited
    burst INTEGER,                   -- token bucket size
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    key_hash BLOB NOT NULL UNIQUE,
    admin INTEGER NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS adapters (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,            -- the weights blob
    config BLOB NOT NULL,            -- adapter_config.json as uploaded
    info TEXT NOT NULL,              -- what the registry reports (JSON)
    bytes INTEGER NOT NULL,          -- stored bytes: config + weights
    created REAL NOT NULL,           -- first version of this (tenant, name)
    updated REAL NOT NULL,           -- this version
    UNIQUE (tenant, name)
);
CREATE INDEX IF NOT EXISTS adapters_sha ON adapters(sha256);
CREATE TABLE IF NOT EXISTS changes (   -- one row per committed put or delete, in commit order
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """Base of the store's own errors."""


class QuotaExceededError(StoreError):
    """An upload over one of the tenant's quotas: nothing is stored."""


class AdapterQuotaError(QuotaExceededError):
    pass


class StorageQuotaError(QuotaExceededError):
    pass


class UnknownKeyError(StoreError):
    pass


class CorruptBlobError(StoreError):
    """A blob whose bytes no longer match its name (disk damage): never served."""


@dataclass(frozen=True)
class Entry:
    """One committed adapter version (a manifest row)."""

    tenant: str
    name: str
    version: int
    sha256: str
    config: bytes
    info: dict
    bytes: int
    created: float
    updated: float


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: its tenant, whether admin, its key (None: no keys in the store)."""

    tenant: str
    admin: bool
    key_id: int | None
    rate_per_s: float | None = None
    burst: int | None = None


@dataclass(frozen=True)
class Quota:
    max_adapters: int | None
    max_bytes: int | None
    rate_per_s: float | None
    burst: int | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.blobs = self.dir / BLOBS
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / DB_NAME
        self._local = threading.local()
        self._write_lock = threading.Lock()  # blob writes + commits + blob removal, in this process
        self._db().executescript(SCHEMA)

    # -- connections --------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken up front)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- tenants and quotas -------------------------------------------------------------
    def _ensure_tenant(self, db: sqlite3.Connection, tenant: str) -> None:
        db.execute("INSERT OR IGNORE INTO tenants (name, created) VALUES (?, ?)", (tenant, time.time()))

    def set_quota(self, tenant: str, **limits) -> Quota:
        """Set some of ``max_adapters``, ``max_bytes``, ``rate_per_s``, ``burst`` (None: unlimited)."""
        unknown = set(limits) - set(Quota.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quota fields {sorted(unknown)}")
        with self._tx() as db:
            self._ensure_tenant(db, tenant)
            for field, value in limits.items():
                db.execute(f"UPDATE tenants SET {field} = ? WHERE name = ?", (value, tenant))
        return self.quota(tenant)

    def quota(self, tenant: str) -> Quota:
        row = self._db().execute(
            "SELECT max_adapters, max_bytes, rate_per_s, burst FROM tenants WHERE name = ?", (tenant,)).fetchone()
        return Quota(*(row or (None, None, None, None)))

    def usage(self) -> dict[str, tuple[int, int]]:
        """Per tenant holding adapters: (adapters, stored bytes)."""
        rows = self._db().execute("SELECT tenant, count(*), sum(bytes) FROM adapters GROUP BY tenant ORDER BY tenant")
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- keys ---------------------------------------------------------------------------
    def create_key(self, tenant: str, admin: bool = False) -> tuple[int, str]:
        """A new key for ``tenant``: (its id, the key itself, which is not stored)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            self._ensure_tenant(db, tenant)
            cur = db.execute("INSERT INTO api_keys (tenant, key_hash, admin, created) VALUES (?, ?, ?, ?)",
                             (tenant, hash_key(key), int(admin), time.time()))
        return cur.lastrowid, key

    def list_keys(self) -> list[dict]:
        rows = self._db().execute("SELECT id, tenant, admin, created, revoked FROM api_keys ORDER BY id")
        return [{"id": r[0], "tenant": r[1], "admin": bool(r[2]), "created": r[3], "revoked": r[4]} for r in rows]

    def revoke_key(self, key_id: int) -> None:
        with self._tx() as db:
            if db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)).rowcount == 0:
                if db.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
                    raise UnknownKeyError(f"no key with id {key_id}")

    def has_keys(self) -> bool:
        return self._db().execute("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0] == 1

    def authenticate(self, key: str) -> Caller | None:
        """The caller a live key belongs to, else None. One indexed read: revocation is immediate."""
        digest = hash_key(key)
        row = self._db().execute(
            "SELECT k.key_hash, k.tenant, k.admin, k.id, t.rate_per_s, t.burst FROM api_keys k "
            "JOIN tenants t ON t.name = k.tenant WHERE k.key_hash = ? AND k.revoked IS NULL", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return Caller(row[1], bool(row[2]), row[3], row[4], row[5])

    def anonymous(self) -> Caller:
        """The caller of a store without keys: the default tenant, with admin rights."""
        q = self.quota(DEFAULT_TENANT)
        return Caller(DEFAULT_TENANT, True, None, q.rate_per_s, q.burst)

    # -- blobs --------------------------------------------------------------------------
    def _write_blob(self, sha: str, data: bytes) -> None:
        """``data`` as ``blobs/<sha>`` (kept if already there); call inside a write transaction."""
        path = self.blobs / sha
        if not path.exists():
            tmp = self.blobs / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.blobs)

    def read_blob(self, sha: str) -> bytes:
        data = (self.blobs / sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise CorruptBlobError(f"stored weights {sha[:12]} do not match their hash")
        return data

    def _drop_blob_if_unreferenced(self, sha: str) -> None:
        """Remove blob ``sha`` if no row references it (its own write transaction)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM adapters WHERE sha256 = ?", (sha,)).fetchone() is None:
                (self.blobs / sha).unlink(missing_ok=True)

    def recover(self) -> tuple[int, int]:
        """Remove crash debris (temp files) and blobs no row references: (debris, blobs) removed.
        Safe while other processes use the store: it holds the write lock they hold from blob
        write to commit."""
        with self._write_lock, self._tx() as db:
            referenced = {r[0] for r in db.execute("SELECT sha256 FROM adapters")}
            debris = blobs = 0
            for p in self.blobs.iterdir():
                if p.name.startswith(TMP_PREFIX) or not p.is_file():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    debris += 1
                elif p.name not in referenced:
                    p.unlink()
                    blobs += 1
            if debris or blobs:
                _fsync_dir(self.blobs)
            return debris, blobs

    # -- the manifest -------------------------------------------------------------------
    def put_adapter(self, tenant: str, name: str, config: bytes, weights: bytes, info: dict) -> tuple[Entry, Entry | None]:
        """Store (or replace) ``tenant/name`` in one transaction: (new entry, replaced entry)."""
        size = len(config) + len(weights)
        with self._write_lock:
            sha = hashlib.sha256(weights).hexdigest()
            try:
                with self._tx() as db:  # the write lock from the blob's first byte to the commit
                    self._write_blob(sha, weights)
                    self._ensure_tenant(db, tenant)
                    old = self._entry(db, tenant, name)
                    self._check_quota(db, tenant, size, old)
                    now = time.time()
                    if old is not None:
                        db.execute("DELETE FROM adapters WHERE version = ?", (old.version,))
                    db.execute(
                        "INSERT INTO adapters (tenant, name, sha256, config, info, bytes, created, updated) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (tenant, name, sha, config, json.dumps(info), size, old.created if old else now, now))
                    new = self._entry(db, tenant, name)
                    self._log_change(db, tenant, name)
            except BaseException:
                self._drop_blob_if_unreferenced(sha)
                raise
            if old is not None and old.sha256 != sha:
                self._drop_blob_if_unreferenced(old.sha256)
        return new, old

    def delete_adapter(self, tenant: str, name: str) -> Entry | None:
        """Remove ``tenant/name`` in one transaction; its blob goes once nothing references it."""
        with self._write_lock:
            with self._tx() as db:
                old = self._entry(db, tenant, name)
                if old is not None:
                    db.execute("DELETE FROM adapters WHERE version = ?", (old.version,))
                    self._log_change(db, tenant, name)
            if old is not None:
                self._drop_blob_if_unreferenced(old.sha256)
        return old

    def _check_quota(self, db: sqlite3.Connection, tenant: str, size: int, replaced: Entry | None) -> None:
        max_adapters, max_bytes = db.execute("SELECT max_adapters, max_bytes FROM tenants WHERE name = ?", (tenant,)).fetchone()
        count, used = db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM adapters WHERE tenant = ?", (tenant,)).fetchone()
        if replaced is not None:
            count, used = count - 1, used - replaced.bytes
        if max_adapters is not None and count + 1 > max_adapters:
            raise AdapterQuotaError(f"adapter quota reached: at most {max_adapters} adapters")
        if max_bytes is not None and used + size > max_bytes:
            raise StorageQuotaError(f"storage quota exceeded: {used} of {max_bytes} bytes used, this adapter needs {size}")

    _COLUMNS = "tenant, name, version, sha256, config, info, bytes, created, updated"

    @staticmethod
    def _row(r) -> Entry:
        return Entry(r[0], r[1], r[2], r[3], bytes(r[4]), json.loads(r[5]), r[6], r[7], r[8])

    def _entry(self, db: sqlite3.Connection, tenant: str, name: str) -> Entry | None:
        r = db.execute(f"SELECT {self._COLUMNS} FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
        return None if r is None else self._row(r)

    def entry(self, tenant: str, name: str) -> Entry | None:
        return self._entry(self._db(), tenant, name)

    def entries(self) -> list[Entry]:
        return [self._row(r) for r in self._db().execute(f"SELECT {self._COLUMNS} FROM adapters ORDER BY tenant, name")]

    # -- the change log --------------------------------------------------------------------
    @staticmethod
    def _log_change(db: sqlite3.Connection, tenant: str, name: str) -> None:
        seq = db.execute("INSERT INTO changes (tenant, name) VALUES (?, ?)", (tenant, name)).lastrowid
        db.execute("DELETE FROM changes WHERE seq <= ?", (seq - CHANGE_LOG_ROWS,))

    def last_change(self) -> int:
        """The newest change's number (0: none yet). One read of the log's last key: what every
        lookup of a serving registry costs when nothing changed."""
        return self._db().execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def changes_since(self, seq: int | None) -> tuple[int, list[tuple[str, str]] | None]:
        """``(newest change, the (tenant, name) pairs put or deleted after change seq)``, read in
        one snapshot. The pairs are None when the log cannot tell: ``seq`` is None, the rows after it
        were pruned, or the log ends before ``seq`` (another store file). Read everything then."""
        db = self._db()
        db.execute("BEGIN")
        try:
            latest = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            rows = [] if seq is None else db.execute("SELECT seq, tenant, name FROM changes WHERE seq > ? ORDER BY seq",
                                                     (seq,)).fetchall()
        finally:
            db.execute("COMMIT")
        if seq is None or latest < seq or (rows and rows[0][0] != seq + 1):
            return latest, None
        return latest, list(dict.fromkeys((tenant, name) for _, tenant, name in rows))

    # -- one-time imports ---------------------------------------------------------------
    def imported(self, source: str) -> bool:
        return self._db().execute("SELECT 1 FROM meta WHERE key = ?", (f"imported:{source}",)).fetchone() is not None

    def mark_imported(self, source: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"imported:{source}", str(time.time())))
