"""/v1/embeddings through the official openai client, against a live server: a tiny embedding
GGUF (mean pooling in its metadata) beside the tiny chat model, and the real SmolLM2 serving
embeddings itself (mean pooling)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import write_tiny_gguf
from tests.e2e.test_openai import api


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embed") / "tiny-embed.gguf"
    return write_tiny_gguf(path, pooling=1, seed=3)  # 1: mean


def test_embeddings_float_base64_tokens_and_limits(
    settings_kwargs: dict[str, Any], embedding_model: Path
) -> None:
    with api(
        settings_kwargs,
        embedding_model_path=embedding_model,
        embedding_n_ctx=32,
        embedding_max_inputs=4,
    ) as (client, app):
        texts = ["hello world", "日本語のテキスト", "a chat stream model"]
        together = client.embeddings.create(model="tiny-embed", input=texts)
        assert together.model == "tiny-embed"
        assert [d.index for d in together.data] == [0, 1, 2]
        vectors = np.array([d.embedding for d in together.data])
        assert vectors.shape == (3, 64)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # Batched together or one by one: the same vectors.
        alone = [
            client.embeddings.create(model="tiny-embed", input=t).data[0].embedding for t in texts
        ]
        assert np.allclose(vectors, np.array(alone), atol=1e-4)
        assert together.usage.prompt_tokens == together.usage.total_tokens > 3

        raw = client.embeddings.with_raw_response.create(
            model="tiny-embed", input=texts[0], encoding_format="base64"
        ).http_response.json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, vectors[0], atol=1e-6)

        url = app.state.url
        ids = httpx.post(url + "/tokenize", json={"content": "hello"}).json()["tokens"]
        by_ids = client.embeddings.create(model="tiny-embed", input=[ids, ids])
        assert np.allclose(by_ids.data[0].embedding, by_ids.data[1].embedding)
        assert client.embeddings.create(model="tiny-embed", input="x", dimensions=64).data
        # The model may be left out: the embedding model answers.
        bare = httpx.post(url + "/v1/embeddings", json={"input": "hello world"}, timeout=30)
        assert np.allclose(bare.json()["data"][0]["embedding"], vectors[0], atol=1e-4)

        models = [m.id for m in client.models.list().data]
        assert models == ["tiny", "tiny-embed"]

        for kwargs, param in (
            ({"input": ["a"] * 5}, "input"),
            ({"input": ["short", "long " * 40]}, "input.1"),
            ({"input": "x", "dimensions": 32}, "dimensions"),
            ({"input": [[10**7]]}, "input"),
            ({"input": "x", "model": "tiny-embedder"}, "model"),
        ):
            error = openai.BadRequestError if param != "model" else openai.NotFoundError
            with pytest.raises(error) as refused:
                client.embeddings.create(**{"model": "tiny-embed", **kwargs})
            assert refused.value.param == param
        # The chat model still answers beside it.
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None


def test_no_embeddings_unless_set_up(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        with pytest.raises(openai.NotFoundError) as missing:
            client.embeddings.create(model="tiny", input="hello")
        assert missing.value.param == "model" and "serves no embeddings" in str(missing.value)


def test_smollm2_embeds_similar_sentences_closer(
    settings_kwargs: dict[str, Any], smollm2: Path
) -> None:
    with api(settings_kwargs, model_path=smollm2, embeddings_from_chat_model=True, n_ctx=1024) as (
        client,
        _,
    ):
        sentences = [
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Stock markets fell sharply on Tuesday.",
            "Shares dropped steeply at the stock exchange.",
        ]
        reply = client.embeddings.create(model="SmolLM2-135M-Instruct.Q4_1", input=sentences)
        v = np.array([d.embedding for d in reply.data])
        similarity = v @ v.T
        assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[0, 3]
        assert similarity[2, 3] > similarity[2, 0] and similarity[2, 3] > similarity[2, 1]
