"""The rest of the OpenAI surface through the official openai client, against a live server on
the tiny model: log probabilities, logit bias, cached tokens, system fingerprint, the reply
length above the default, an omitted model, fields refused rather than ignored, and
/tokenize and /detokenize."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.test_openai import MODEL, api, hello

JAPANESE = [{"role": "user", "content": "日本語で自己紹介してください。"}]


def test_logprobs_whole_and_streamed(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        asked = {
            "model": MODEL,
            "messages": JAPANESE,
            "max_tokens": 24,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "extra_body": {"ignore_eos": True},
        }
        reply = client.chat.completions.create(**asked)
        choice = reply.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content is not None
        tokens = choice.logprobs.content
        assert len(tokens) == 24
        # The bytes of the tokens are exactly the reply's, multibyte characters included.
        assert b"".join(bytes(t.bytes or []) for t in tokens) == choice.message.content.encode()
        for t in tokens:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            tops = [top.logprob for top in t.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            # Greedy: the chosen token is the most likely one.
            assert t.bytes == t.top_logprobs[0].bytes and t.logprob == tops[0]
        assert math.exp(tokens[0].logprob) <= 1

        stream = client.chat.completions.create(**asked, stream=True)
        streamed = [
            t
            for chunk in stream
            if chunk.choices and chunk.choices[0].logprobs
            for t in chunk.choices[0].logprobs.content or []
        ]
        assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in tokens]
        # (the prompt now comes from the cache: its last token read alone, a little apart)
        assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-3)

        # Stopped by a stop string: the log probabilities are those of the tokens whose text
        # was sent (the last may run on into the stop string), none wholly inside it.
        stop = choice.message.content[3:5]
        stopped = client.chat.completions.create(**asked, stop=[stop]).choices[0]
        kept = stopped.logprobs.content or []  # type: ignore[union-attr]
        sent = b"".join(bytes(t.bytes or []) for t in kept)
        content = (stopped.message.content or "").encode()
        assert sent.startswith(content)
        assert len(b"".join(bytes(t.bytes or []) for t in kept[:-1])) < len(content)

        text = client.completions.create(
            model=MODEL, prompt="日本語", max_tokens=12, temperature=0, logprobs=2
        )
        legacy_text = text.choices[0].text
        offsets = text.choices[0].logprobs.text_offset or []  # type: ignore[union-attr]
        assert offsets == sorted(offsets) and offsets[-1] <= len(legacy_text)
        legacy = text.choices[0].logprobs
        assert (
            legacy is not None
            and legacy.tokens
            and len(legacy.tokens) == len(legacy.token_logprobs or [])
        )
        assert all(len(top) <= 2 for top in legacy.top_logprobs or [])

        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**hello(top_logprobs=2))
        assert bad.value.param == "top_logprobs"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**hello(logprobs=True, top_logprobs=21))
        assert bad.value.param == "top_logprobs"


def test_logit_bias_bans_the_greedy_token(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (client, _):
        greedy = {**hello(max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)}
        first = client.chat.completions.create(**greedy).model_dump()
        chosen = first["choices"][0]["logprobs"]["content"][0]["id"]
        banned = client.chat.completions.create(
            **greedy, logit_bias={str(chosen): -100}
        ).model_dump()
        token = banned["choices"][0]["logprobs"]["content"][0]
        assert token["id"] != chosen
        assert chosen not in [t["id"] for t in token["top_logprobs"]]
        # The runner-up of the unbiased distribution takes its place.
        runner_up = first["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["id"]
        assert token["id"] == runner_up
        for bias, why in (({"999999": 5}, "not a token id"), ({"x": 1}, "not a token id")):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(**hello(logit_bias=bias))
            assert bad.value.param == "logit_bias" and why in str(bad.value)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**hello(logit_bias={"1": 101}))
        assert bad.value.param == "logit_bias.1"


def test_cached_tokens_fingerprint_and_reply_length(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, num_of_concurrent_executions=1) as (client, _):
        asked = hello(max_tokens=4, temperature=0)
        first = client.chat.completions.create(**asked)
        again = client.chat.completions.create(**asked)
        assert first.usage and again.usage
        details = first.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens == 0
        cached = again.usage.prompt_tokens_details
        assert cached is not None and cached.cached_tokens == again.usage.prompt_tokens - 1
        assert first.system_fingerprint and first.system_fingerprint == again.system_fingerprint
        # Above the default reply length (64 here), up to what the context allows...
        longer = client.chat.completions.create(
            **hello(max_tokens=220, extra_body={"ignore_eos": True})
        )
        assert longer.usage and longer.usage.completion_tokens == 220
        # ...and beyond the room left, cut to it rather than refused.
        room = 512 - first.usage.prompt_tokens
        cut = client.chat.completions.create(
            **hello(max_tokens=511, extra_body={"ignore_eos": True})
        )
        assert cut.choices[0].finish_reason == "length"
        assert cut.usage and cut.usage.completion_tokens == room


def test_model_optional_aliases_and_refused_fields(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs, model_aliases=["gpt-4o-mini"]) as (client, app):
        url = app.state.url
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        served = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert served.status_code == 200 and served.json()["model"] == MODEL
        text = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert text.status_code == 200
        alias = client.chat.completions.create(**{**hello(max_tokens=2), "model": "gpt-4o-mini"})
        assert alias.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**{**hello(), "model": "gpt-9"})
        for extra, param in (
            ({"reasoning_effort": "low"}, "reasoning_effort"),
            ({"metadata": {"a": "b"}}, "metadata"),
            ({"store": True}, "store"),
            ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
            ({"typical_p": 0.5}, "typical_p"),
        ):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(**hello(), extra_body=extra)
            assert bad.value.param == param
        for extra, param in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix")):
            with pytest.raises(openai.BadRequestError) as bad:
                client.completions.create(model=MODEL, prompt="a", extra_body=extra)
            assert bad.value.param == param
        # The harmless values of OpenAI's own fields are accepted.
        fine = client.chat.completions.create(
            **hello(max_tokens=2), store=False, service_tier="auto", logprobs=False
        )
        assert fine.choices[0].message.content is not None


def test_tokenize_and_detokenize(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (_, app):
        url = app.state.url
        text = "Hello, 世界"
        ids = httpx.post(url + "/tokenize", json={"content": text}).json()["tokens"]
        assert ids and all(isinstance(t, int) for t in ids)
        back = httpx.post(url + "/detokenize", json={"tokens": ids}).json()["content"]
        # The tiny vocabulary writes its word-start marker as text, as its replies do.
        assert back.replace("▁", " ").lstrip() == text
        pieces = httpx.post(url + "/tokenize", json={"content": text, "with_pieces": True})
        listed = pieces.json()["tokens"]
        assert [p["id"] for p in listed] == ids
        joined = b"".join(
            p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
            for p in listed
        )
        assert joined.decode() == back
        bad = httpx.post(url + "/detokenize", json={"tokens": [1, 10**9]})
        assert bad.status_code == 400 and bad.json()["field"] == "tokens.1"
        wrong = httpx.post(url + "/tokenize", json={"text": "x"})
        assert wrong.status_code == 400


def test_a_session_may_ask_for_more_than_the_default_reply(settings_kwargs: dict[str, Any]) -> None:
    with api(settings_kwargs) as (_, app), httpx.Client(base_url=app.state.url) as web:
        more = web.post("/set_generation_params", json={"max_new_tokens": 300})
        assert more.status_code == 200 and more.json()["max_new_tokens"] == 300
        too_many = web.post("/set_generation_params", json={"max_new_tokens": 512})
        assert too_many.status_code == 400 and too_many.json()["field"] == "max_new_tokens"
        assert web.post("/chat_stream", json={"user_input": "hi"}).status_code == 200
        # All the context: the prompt still fits (room for the default reply is kept), and
        # the reply is cut to what the prompt leaves; turns go on.
        most = web.post("/set_generation_params", json={"max_new_tokens": 511})
        assert most.status_code == 200
        for _ in range(2):
            assert web.post("/chat_stream", json={"user_input": "hi again"}).status_code == 200
