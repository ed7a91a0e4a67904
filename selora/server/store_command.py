"""``selora store import|list|quota``: fill the store from adapter directories, list what it
holds, set per-tenant quotas."""

from __future__ import annotations

import argparse

from selora.runtime.store import DEFAULT_TENANT, AdapterStore
from selora.server.keys import add_store_argument, when

MiB = 1 << 20

QUOTA_FIELDS = {"max_adapters": int, "max_mb": float, "rate": float, "burst": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="copy every format-v1 adapter directory under DIR into the store "
                         "(a running server serves them from its next request; keys and quotas apply at once)")
    imp.add_argument("directory", metavar="DIR")
    imp.add_argument("--tenant", default=DEFAULT_TENANT, help=f"owner of the imported adapters (default {DEFAULT_TENANT})")
    sub.add_parser("list", help="every stored adapter: tenant, name, version, stored bytes, content hash, updated")
    quota = sub.add_parser("quota", help="show or set a tenant's quotas ('none': unlimited)")
    quota.add_argument("tenant")
    quota.add_argument("--max-adapters", help="adapters the tenant may store")
    quota.add_argument("--max-mb", help="stored MiB (config + weights) of its adapters")
    quota.add_argument("--rate", help="requests per second (token bucket refill)")
    quota.add_argument("--burst", help="token bucket size (default: the rate, rounded up)")


def _limit(field: str, raw: str, kind):
    if raw.lower() == "none":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"selora store quota: {field} {raw!r} is not a number or 'none'") from None
    if value < 0 or (field == "rate" and value == 0):
        raise SystemExit(f"selora store quota: {field} must be {'above' if field == 'rate' else 'at least'} 0")
    return value


def run(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    if args.action == "import":
        from selora.runtime.registry import RegistryError, import_tree  # torch: only when importing

        try:
            names = import_tree(store, args.directory, args.tenant)
        except (OSError, RegistryError) as e:
            raise SystemExit(f"selora store import: {e}") from None
        print(f"imported {len(names)} adapters into tenant {args.tenant}: {', '.join(names) or '-'}")
        return 0
    if args.action == "list":
        print(f"{'tenant':20} {'name':24} {'version':>7} {'bytes':>10}  {'sha256':12}  updated")
        for e in store.entries():
            print(f"{e.tenant:20} {e.name:24} {e.version:>7} {e.bytes:>10}  {e.sha256[:12]}  {when(e.updated)}")
        return 0
    limits = {}
    for field, kind in QUOTA_FIELDS.items():
        raw = getattr(args, field)
        if raw is not None:
            limits[field] = _limit(field, raw, kind)
    if "max_mb" in limits:
        mb = limits.pop("max_mb")
        limits["max_bytes"] = None if mb is None else int(mb * MiB)
    if "rate" in limits:
        limits["rate_per_s"] = limits.pop("rate")
    q = store.set_quota(args.tenant, **limits) if limits else store.quota(args.tenant)
    show = lambda v: "unlimited" if v is None else v  # noqa: E731
    adapters, nbytes = store.usage().get(args.tenant, (0, 0))
    print(f"tenant {args.tenant}: adapters {show(q.max_adapters)}, bytes {show(q.max_bytes)}, "
          f"requests/s {show(q.rate_per_s)}, burst {show(q.burst)}; using {adapters} adapters, {nbytes} bytes")
    return 0
