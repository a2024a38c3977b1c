"""`llamastream serve` as its own process: history across a restart, and the real SmolLM2 model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, subprocess_server


def _serve(port: int, *flags: str):  # type: ignore[no-untyped-def]
    args = [sys.executable, "-m", "llamastream", "serve", "--port", str(port), *flags]
    return subprocess_server(args, {"PYTHONUNBUFFERED": "1"}, port)


def test_history_survives_a_restart(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    flags = ["--model", str(tiny_model), "--session-dir", str(tmp_path / "s"), "--n-ctx", "512"]
    flags += ["--max-new-tokens", "16"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        with _serve(port, *flags):
            replies = [client.post("/chat_stream", json={"user_input": q}).text for q in "ab"]
            before = client.get("/get_prompt").json()
        with _serve(port, *flags):
            after = client.get("/get_prompt").json()
            assert after == before
            assert [m["content"] for m in after["messages"]] == ["a", replies[0], "b", replies[1]]
            assert client.post("/chat_stream", json={"regenerate": True}).status_code == 200


@pytest.mark.slow
def test_chat_with_the_real_smollm2_model(smollm2: Path, tmp_path: Path) -> None:
    port = free_port()
    # No --model: serve finds (or downloads) its default model in --models-dir.
    flags = ["--models-dir", str(smollm2.parent), "--session-dir", str(tmp_path / "s")]
    flags += ["--max-new-tokens", "48", "--temperature", "0", "--system-prompt", "Be brief."]
    with _serve(port, *flags), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        question = {"user_input": "What is the capital of France?"}
        with c.stream("POST", "/chat_stream", json=question) as r:
            assert r.status_code == 200
            chunks = [chunk for chunk in r.iter_raw() if chunk]
        reply = b"".join(chunks).decode("utf-8")
        assert len(chunks) > 3
        assert "\ufffd" not in reply
        assert "paris" in reply.lower()
        messages = c.get("/get_prompt").json()["messages"]
        assert messages[-1]["content"] == reply
        assert c.get("/health").json()["model"] == smollm2.name


@pytest.mark.slow
def test_openai_json_mode_with_the_real_model(smollm2: Path, tmp_path: Path) -> None:
    import openai

    port = free_port()
    flags = ["--model", str(smollm2), "--session-dir", str(tmp_path / "s")]
    flags += ["--max-new-tokens", "200", "--api-keys", "k1,k2"]
    with _serve(port, *flags):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0)
        reply = client.chat.completions.create(
            model=smollm2.stem,
            messages=[
                {"role": "system", "content": "Answer in JSON."},
                {"role": "user", "content": 'Give {"city": ..., "country": ...} for Paris.'},
            ],
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=200,
        )
        client.close()
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


@pytest.mark.slow
def test_interleaved_conversations_keep_their_caches(smollm2: Path, tmp_path: Path) -> None:
    """Stateless clients resend the history; each lands on the slot that still holds it."""
    import openai

    from llamastream import create_app
    from tests.conftest import LiveServer

    app = create_app(
        model_path=smollm2, session_dir=tmp_path / "s", num_of_concurrent_executions=3, n_ctx=2048
    )
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        worker = app.state.service.pool.workers[0]
        histories: list[list[dict[str, str]]] = [[] for _ in range(3)]
        before = (0, 0)
        for turn in range(3):
            if turn == 2:
                before = (worker.prompt_tokens, worker.reused_tokens)
            for n, history in enumerate(histories):
                history.append({"role": "user", "content": f"Story {n}, part {turn}: go on."})
                reply = client.chat.completions.create(
                    model=smollm2.stem, messages=history, max_tokens=24, temperature=0
                )
                history.append({"role": "assistant", "content": reply.choices[0].message.content})
        client.close()
    prompt = worker.prompt_tokens - before[0]
    reused = worker.reused_tokens - before[1]
    assert reused > 0.8 * prompt, (reused, prompt)
