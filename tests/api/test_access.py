"""Access is checked the same way on every route family, answered in the family's envelope."""

from __future__ import annotations

from tests.api.conftest import Client

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_v1_route_without_a_key_gets_401_in_openai_shape(api: Client) -> None:
    async with api(api_keys=["user-key"]) as (client, _):
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "error" in wrong.json() and "type" in wrong.json()["error"]
        ok = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer user-key"}
        )
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


async def test_a_native_admin_route_refuses_a_user_key_with_403_in_native_shape(
    api: Client,
) -> None:
    roles = {"metrics": "admin", "chat_stream": "user"}
    async with api(api_keys=["u"], admin_keys=["a"], endpoint_roles=roles) as (client, _):
        forbidden = await client.get("/metrics", headers={"Authorization": "Bearer u"})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"] == "forbidden"
        missing = await client.post("/chat_stream", json={"user_input": "hi"})
        assert missing.status_code == 401
        assert missing.json()["error"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        admin = await client.get("/metrics", headers={"Authorization": "Bearer a"})
        assert admin.status_code == 200
        assert b"llamastream_busy_slots" in admin.content


async def test_unknown_v1_paths_need_no_key_to_be_told_they_do_not_exist(api: Client) -> None:
    async with api(api_keys=["k"]) as (client, _):
        missing = await client.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
