"""Several candidates in one request: `n` on chat and text completions, and several prompts on
/v1/completions, run as parallel slots sharing the prompt's cache, through the openai client."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.test_openai import MODEL, api

# Long enough for the candidates to copy the first one's prompt cache (16 tokens at least).
LONG = [{"role": "user", "content": "Tell me a story about a llama who streams chat. " * 3}]


def test_n_candidates_whole_and_streamed(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, num_of_concurrent_executions=3) as (client, app):
        worker = app.state.service.pool.workers[0]
        read_before = worker.prompt_tokens - worker.reused_tokens
        asked: dict[str, Any] = {
            "model": MODEL,
            "messages": LONG,
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": 5,
            "n": 3,
            "extra_body": {"ignore_eos": True},
        }
        reply = client.chat.completions.create(**asked)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        texts = [c.message.content for c in reply.choices]
        assert reply.usage is not None and reply.usage.completion_tokens == 36
        prompt = reply.usage.prompt_tokens
        # The prompt was read once; the two other candidates copied its cache.
        read = worker.prompt_tokens - worker.reused_tokens - read_before
        assert read <= prompt + 2

        # Each candidate has its own seed (seed, seed + 1, ...): the replies asked one by one.
        alone = [
            client.chat.completions.create(**{**asked, "n": 1, "seed": 5 + k}) for k in range(3)
        ]
        assert texts == [a.choices[0].message.content for a in alone]
        assert len(set(texts)) > 1

        streamed: dict[int, str] = {}
        ends: dict[int, str | None] = {}
        for chunk in client.chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}
        ):
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + (
                    choice.delta.content or ""
                )
                if choice.finish_reason:
                    ends[choice.index] = choice.finish_reason
            if chunk.usage is not None:
                assert chunk.usage.completion_tokens == 36
                assert chunk.usage.prompt_tokens == prompt
        assert ends == {0: "length", 1: "length", 2: "length"}
        assert [streamed[i] for i in range(3)] == texts  # the same seeds: the same replies

        greedy = client.chat.completions.create(**{**asked, "temperature": 0, "n": 2})
        assert greedy.choices[0].message.content == greedy.choices[1].message.content

        with pytest.raises(openai.BadRequestError) as too_many:
            client.chat.completions.create(**{**asked, "n": 4})  # 3 slots
        assert too_many.value.param == "n"


def test_several_prompts_text_or_tokens(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, app):
        reply = client.completions.create(
            model=MODEL, prompt=["Once upon a time", "日本語"], max_tokens=5, temperature=0
        )
        assert [c.index for c in reply.choices] == [0, 1]
        alone = [
            client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0)
            for p in ("Once upon a time", "日本語")
        ]
        assert [c.text for c in reply.choices] == [a.choices[0].text for a in alone]
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)

        url = app.state.url
        # The prompt's tokens as /v1/completions reads its text: the BOS token first.
        asked = {"content": "Once upon a time", "add_special": True}
        ids = httpx.post(url + "/tokenize", json=asked).json()["tokens"]
        by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
        assert by_ids.choices[0].text == alone[0].choices[0].text
        pair = client.completions.create(
            model=MODEL, prompt=[ids, ids[:2]], max_tokens=3, temperature=0
        )
        assert len(pair.choices) == 2
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt=[ids, [10**8]], max_tokens=3)
        assert bad.value.param == "prompt.1"
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=3)
        assert bad.value.param == "prompt"  # three candidates, two slots
        streamed = client.completions.create(
            model=MODEL,
            prompt=["Once upon a time", "日本語"],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        texts: dict[int, str] = {}
        for chunk in streamed:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
        assert [texts[0], texts[1]] == [c.text for c in reply.choices]
