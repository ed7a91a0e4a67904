"""Every case of the hostile corpus against the real app: its 4xx in the one error shape, a
message without server paths or object reprs, and no state change."""

from __future__ import annotations

import pytest

from tests.adversarial import corpus
from tests.helpers import snapshot

STATIC = corpus.body_cases() + corpus.image_cases() + corpus.path_cases()


@pytest.fixture(scope="module")
def before(hostile_client, hostile_root):
    return snapshot(hostile_client, hostile_root)


def _check(client, root, case: corpus.Case, before: dict) -> None:
    resp = client.request(case.method, case.url, **case.request)
    assert resp.status_code == case.status, f"{case.id}: {resp.status_code} {resp.text[:300]}"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, case.id
    assert body["error"]["type"] == case.kind, f"{case.id}: {body}"
    message = body["error"]["message"]
    assert message and str(root) not in message and " at 0x" not in message, f"{case.id}: {message}"
    assert snapshot(client, root) == before, f"{case.id} changed the state"


@pytest.mark.parametrize("case", STATIC, ids=[c.id for c in STATIC])
def test_static_case(hostile_client, hostile_root, before, case):
    _check(hostile_client, hostile_root, case, before)


def test_adapter_cases(hostile_client, hostile_root, before, adapter_files, dora_files):
    cases = corpus.adapter_cases(adapter_files) + [corpus.dora_overflow_case(dora_files)]
    assert len({c.id for c in cases}) == len(cases)
    for case in cases:
        _check(hostile_client, hostile_root, case, before)
