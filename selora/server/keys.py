"""``selora keys create|list|revoke``: API keys of the store (only their hashes are kept)."""

from __future__ import annotations

import argparse
import datetime
import os

from selora.runtime.store import SHARED_TENANT, AdapterStore, UnknownKeyError, valid_name


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=os.environ.get("SELORA_STORE", "selora-store"),
                        help="store directory (env SELORA_STORE; default selora-store)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a key; it is printed once, alone on the last line")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for (created if new)")
    create.add_argument("--admin", action="store_true", help="may manage every tenant's adapters, shared ones and /metrics")
    sub.add_parser("list", help="every key: id, tenant, admin, created, revoked")
    revoke = sub.add_parser("revoke", help="revoke a key at once (a running server refuses it from its next request)")
    revoke.add_argument("id", type=int)


def when(t: float | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    if args.action == "create":
        if not valid_name(args.tenant):
            raise SystemExit(f"selora keys: invalid tenant name {args.tenant!r}: use 1-64 characters [A-Za-z0-9._-], "
                             "starting with a letter or digit")
        if args.tenant == SHARED_TENANT:
            raise SystemExit(f"selora keys: {SHARED_TENANT!r} holds the shared adapters; it has no keys of its own")
        key_id, key = store.create_key(args.tenant, args.admin)
        print(f"key {key_id} for tenant {args.tenant}{' (admin)' if args.admin else ''}; it is shown only this once:")
        print(key)
    elif args.action == "list":
        print(f"{'id':>4}  {'tenant':20} {'admin':5}  {'created':20} revoked")
        for k in store.list_keys():
            print(f"{k['id']:>4}  {k['tenant']:20} {'yes' if k['admin'] else 'no':5}  {when(k['created']):20} {when(k['revoked'])}")
    else:
        try:
            store.revoke_key(args.id)
        except UnknownKeyError as e:
            raise SystemExit(f"selora keys: {e}") from None
        print(f"key {args.id} revoked")
    return 0
