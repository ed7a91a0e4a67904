"""Property-based fuzzing of the live app with schemathesis, from the app's own OpenAPI
document (positive and negative cases for every operation). Every response must be documented
for its route, in its documented schema, never a 5xx; and a refused request must change nothing
(the adapter list, the import root's and the store's files). ``SELORA_FUZZ_EXAMPLES`` (per generation mode) and
``SELORA_FUZZ_RECORD`` (a JSON file of cases, statuses and failures) let
``benchmarks/fuzz.py`` run the same test longer."""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config._auth import OpenAPIAuthConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from selora.runtime.store import DEFAULT_TENANT
from tests.helpers import image_b64, make_app, serve, stored_files, write_adapter

# Every check but "schema-valid data is accepted": a schema cannot say which strings are
# decodable images, so a well-typed request may still be refused with a documented 4xx.
EXAMPLES = int(os.environ.get("SELORA_FUZZ_EXAMPLES", "250"))
RECORD = os.environ.get("SELORA_FUZZ_RECORD")
# names a generator will not hit, so that a valid DELETE cannot remove them
KEPT = ("kept-lora-7f3a9c", "kept-dora-51be02")
tally = {"cases": 0, "statuses": collections.Counter(), "by_operation": collections.Counter(), "failures": []}


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory, tiny_vit):
    root = tmp_path_factory.mktemp("fuzz-root")
    blocks = list(tiny_vit.blocks)
    write_adapter(tiny_vit, root, KEPT[0], active=blocks[:2], seed=1)
    write_adapter(tiny_vit, root, KEPT[1], "dora", active=blocks[2:4], seed=2, head_classes=["cat", "dog"])
    return root


@pytest.fixture(scope="module")
def fuzz_app(fuzz_root, tiny_vit):
    return make_app(tiny_vit, fuzz_root, max_image_pixels=1 << 20, max_request_pixels=2 << 20)


@pytest.fixture(scope="module")
def admin_key(fuzz_app):
    """The store holds a key from here on: every call without it must get 401."""
    return fuzz_app.state.store.create_key(DEFAULT_TENANT, admin=True)[1]


@pytest.fixture(scope="module")
def fuzz_port(fuzz_app, admin_key):
    yield from serve(fuzz_app)


def _kept_state(url: str, root, auth: dict) -> dict:
    listed = requests.get(f"{url}/v1/adapters", headers=auth, timeout=30).json()["data"]
    files = {k: v for k, v in stored_files(root).items() if k.split(os.sep)[0] in KEPT}
    refs = [requests.post(f"{url}/v1/embeddings", json={"model": m, "input": [image_b64(0)]}, headers=auth, timeout=30).json()
            for m in KEPT]
    return {"kept": sorted(a["name"] for a in listed if a["name"] in KEPT), "files": files, "refs": refs}


def _state(url: str, root, auth: dict) -> tuple:
    names = sorted(a["name"] for a in requests.get(f"{url}/v1/adapters", headers=auth, timeout=30).json()["data"])
    return names, stored_files(root), stored_files(f"{root}.store")


@pytest.fixture(scope="module")
def fuzz_url(fuzz_port, fuzz_root, admin_key):
    url = f"http://127.0.0.1:{fuzz_port}"
    auth = {"Authorization": f"Bearer {admin_key}"}
    before = _kept_state(url, fuzz_root, auth)
    started = time.monotonic()
    yield url
    after = _kept_state(url, fuzz_root, auth)
    if RECORD:
        record = {**tally, "statuses": dict(tally["statuses"]), "by_operation": dict(tally["by_operation"]),
                  "examples_per_mode": EXAMPLES, "seconds": round(time.monotonic() - started, 1),
                  "kept_state_unchanged": before == after}
        with open(RECORD, "w") as f:
            json.dump(record, f, indent=1)
    assert before == after, "the fuzzing run changed the kept adapters or their embeddings"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_fuzzed_requests_get_documented_answers_and_refusals_change_nothing(fuzz_url, fuzz_root, admin_key, mode):
    auth = {"Authorization": f"Bearer {admin_key}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", headers=auth)
    schema.config.auth.openapi = OpenAPIAuthConfig(schemes={"HTTPBearer": {"bearer": admin_key}})

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        before = _state(fuzz_url, fuzz_root, auth)
        operation = f"{case.method} {case.path}"
        try:
            response = case.call_and_validate(base_url=fuzz_url, excluded_checks=[positive_data_acceptance])
        except BaseException as e:
            tally["failures"].append({"mode": mode.value, "operation": operation, "error": str(e)[:2000]})
            raise
        tally["cases"] += 1
        tally["statuses"][str(response.status_code)] += 1
        tally["by_operation"][f"{operation} {response.status_code}"] += 1
        if response.status_code >= 400:
            assert _state(fuzz_url, fuzz_root, auth) == before, f"{operation}: a {response.status_code} changed the state"

    fuzz()
