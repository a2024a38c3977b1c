"""Conversations outnumbering slots: a conversation's KV cache is saved when it loses its slot
and restored when it comes back (the real SmolLM2 model, whose replies re-tokenize exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import chat, server

QUESTION = "Tell me about the history of the city of Paris, its rivers, bridges and museums. " * 3


def conversation(settings: dict[str, Any]) -> tuple[list[str], int, int]:
    """Two conversations on one slot; the replies and the worker's figures. Alice's
    conversation is under way (two turns) when Bob takes the slot, so its cache is saved."""
    with server(settings) as (live, app), live.client() as alice, live.client() as bob:
        replies = []
        for client, text in [
            (alice, QUESTION),
            (alice, "Go on, briefly."),
            (bob, "Write a short poem about the sea and the wind."),
            (alice, "And its food?"),
        ]:
            response = chat(client, user_input=text)
            assert response.status_code == 200
            replies.append(response.text)
        worker = app.state.service.pool.workers[0]
        return replies, worker.restored_tokens, worker.reused_tokens


@pytest.mark.slow
def test_a_conversation_back_on_a_taken_slot_resumes_its_saved_cache(
    smollm2: Path, tmp_path: Path
) -> None:
    base = {
        "model_path": smollm2,
        "num_of_concurrent_executions": 1,
        "n_ctx": 2048,
        "max_new_tokens": 24,
        "temperature": 0.0,
        "n_threads": 2,
    }
    with_states, restored, reused = conversation({**base, "session_dir": tmp_path / "a"})
    without, none_restored, _ = conversation(
        {**base, "session_dir": tmp_path / "b", "kv_state_bytes": 0}
    )
    assert restored > 100  # alice's first turn came back from disk
    assert reused >= restored
    assert none_restored == 0
    assert with_states == without  # and the reply is the same as reading it all again
    assert list((tmp_path / "a" / "kv-states").iterdir())


@pytest.mark.slow
def test_conversations_keep_their_caches_across_a_restart(smollm2: Path, tmp_path: Path) -> None:
    """Stopping the server writes the caches still in its slots to disk; after the restart a
    conversation's next turn restores its cache instead of reading its history again, and
    says the same as a server that read it all again."""
    base = {
        "model_path": smollm2,
        "num_of_concurrent_executions": 2,
        "n_ctx": 2048,
        "max_new_tokens": 24,
        "temperature": 0.0,
        "n_threads": 2,
    }

    def run(settings: dict[str, Any]) -> tuple[str, int, int]:
        turns = [QUESTION, "Go on, briefly."]
        with server(settings) as (live, _), live.client() as alice:
            for text in turns:
                assert chat(alice, user_input=text).status_code == 200
            cookies = dict(alice.cookies)
        with server(settings) as (live, app), live.client(cookies=cookies) as alice:
            reply = chat(alice, user_input="And its food?")
            assert reply.status_code == 200
            assert len(alice.get("/get_prompt").json()["messages"]) == 6
            worker = app.state.service.pool.workers[0]
            return reply.text, worker.restored_tokens, worker.prompt_tokens

    resumed, restored, read = run({**base, "session_dir": tmp_path / "a"})
    again, none_restored, _ = run({**base, "session_dir": tmp_path / "b", "kv_state_bytes": 0})
    # Both turns' history came back from disk: only the new turn (about a dozen tokens of
    # "And its food?" in the template) was read.
    assert restored > 100 and read - restored < 20
    assert none_restored == 0
    assert resumed == again
