"""The official OpenAI Python SDK, with its defaults, against a real `selora serve` process."""

import httpx
import numpy as np
import pytest

from selora.runtime.store import DEFAULT_TENANT, AdapterStore
from tests.helpers import image_b64, serving, write_adapter

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip):
    """A server whose store holds one key (tenant ``default``, where the import root's adapters land)."""
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(tiny_clip, root, "c1", active=list(tiny_clip.blocks)[:2] + list(tiny_clip.blocks)[-2:], seed=3)
    _, key = AdapterStore(root / ".store").create_key(DEFAULT_TENANT)
    with serving("--model", "tiny-clip", "--import-root", str(root), "--store", str(root / ".store"),
                 env={"SELORA_MAX_QUEUE": "2"}) as served:
        yield served.url, key


@pytest.fixture
def client(server):
    url, key = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_image_and_text_embeddings_with_the_sdk_defaults(client, server):
    url, key = server
    for model, item in (("c1", image_b64(0)), ("base", "a photo of a cat")):
        got = client.embeddings.create(model=model, input=item)  # the SDK asks for base64 and decodes it
        floats = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": [item], "encoding_format": "float"},
                            headers={"Authorization": f"Bearer {key}"}).json()
        assert got.model == model and got.usage.total_tokens == got.usage.prompt_tokens == floats["usage"]["prompt_tokens"]
        assert np.allclose(got.data[0].embedding, floats["data"][0]["embedding"], atol=0, rtol=0)
        assert len(got.data[0].embedding) == 32
    two = client.embeddings.create(model="base", input=["a cat", "a dog"], encoding_format="float", dimensions=32)
    assert [d.index for d in two.data] == [0, 1] and len(two.data[1].embedding) == 32


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["base", "c1"]
    model = client.models.retrieve("c1")
    assert model.id == "c1" and model.object == "model" and model.owned_by == "selora" and model.created > 0


def test_errors_are_the_sdk_exceptions(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="not-a-key", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a cat")
    with pytest.raises(openai.BadRequestError, match="image"):
        client.embeddings.create(model="base", input="data:image/png;base64,AAAA")
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        client.embeddings.create(model="base", input="a cat", dimensions=8)
    with pytest.raises(openai.UnprocessableEntityError, match="never fetches"):
        client.embeddings.create(model="base", input="https://example.com/cat.png", extra_body={"modality": "image"})
    with pytest.raises(openai.RateLimitError):  # 3 rows cannot fit a queue of 2
        client.embeddings.create(model="base", input=["a", "b", "c"])
