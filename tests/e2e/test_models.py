"""Several models in one server: load on demand, their own queues, LRU eviction under a
memory budget, no unload under a running stream, keep-alive, a broken file, admin endpoints,
per-model metrics, the session's model, n_gpu_layers auto against a device budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llamastream import create_app
from llamastream.config import ModelConfig, Settings
from tests.conftest import LiveServer, eventually, wait_idle, write_tiny_gguf
from tests.e2e.conftest import metric, paused

ADMIN = {"Authorization": "Bearer root"}
GREEDY = {"temperature": 0, "max_tokens": 8}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny models of different shapes: about 1, 7.6 and 14.6 MiB planned with two
    slots of 512 tokens."""
    root = tmp_path_factory.mktemp("models")
    return {
        "small": write_tiny_gguf(root / "small.gguf", n_embd=64, n_layer=2, seed=1),
        "mid": write_tiny_gguf(root / "mid.gguf", n_embd=256, n_layer=2, seed=2),
        "big": write_tiny_gguf(root / "big.gguf", n_embd=256, n_layer=4, seed=3),
    }


def _settings(shapes: dict[str, Path], tmp_path: Path, **changes: Any) -> dict[str, Any]:
    models = changes.pop("models", None)
    return {
        "model_path": shapes["small"],
        "models": models
        if models is not None
        else [
            {"name": "mid", "model_path": str(shapes["mid"])},
            {"name": "big", "model_path": str(shapes["big"]), "aliases": ["large"]},
        ],
        "session_dir": tmp_path / "sessions",
        "num_of_concurrent_executions": 2,
        "max_queue_size": 4,
        "n_ctx": 512,
        "max_new_tokens": 16,
        "seed": 1234,
        "n_threads": 1,
        "admin_keys": ["root"],
        **changes,
    }


@contextlib.contextmanager
def served(shapes: dict[str, Path], tmp_path: Path, **changes: Any) -> Iterator[LiveServer]:
    app = create_app(**_settings(shapes, tmp_path, **changes))
    with LiveServer(app) as live:
        live.app = app  # type: ignore[attr-defined]
        yield live
        with live.client() as probe:
            wait_idle(probe)


def states(client: httpx.Client) -> dict[str, str]:
    listed = client.get("/v1/models").json()["data"]
    return {m["id"]: m["state"] for m in listed}


def complete(client: httpx.Client, model: str | None, **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"messages": HI, **GREEDY, **body}
    if model is not None:
        payload["model"] = model
    return client.post("/v1/chat/completions", json=payload)


def asking(live: LiveServer, name: str, out: list[httpx.Response]) -> threading.Thread:
    """A started thread asking ``name`` once on a client of its own (the answer in ``out``)."""

    def ask() -> None:
        with live.client() as own:
            out.append(complete(own, name))

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_models_load_on_demand_and_answer_by_name(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path) as live, live.client() as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["state"], m["context_length"]) for m in listed] == [
            ("small", "loaded", 512),
            ("mid", "unloaded", 512),
            ("big", "unloaded", 512),
        ]
        assert client.get("/health").json()["models"] == {
            "small": "loaded",
            "mid": "unloaded",
            "big": "unloaded",
        }

        replies = {}
        for name in (None, "mid", "large"):
            response = complete(client, name)
            assert response.status_code == 200, response.text
            replies[name] = response.json()
        assert replies[None]["model"] == "small"  # no model: the default
        assert replies["mid"]["model"] == "mid"
        assert replies["large"]["model"] == "big"  # an alias
        assert states(client) == {"small": "loaded", "mid": "loaded", "big": "loaded"}
        # Different weights, same greedy request: different replies.
        texts = {r["choices"][0]["message"]["content"] for r in replies.values()}
        assert len(texts) == 3

        # The same request again gives the same reply from an already loaded model.
        again = complete(client, "mid").json()
        assert (
            again["choices"][0]["message"]["content"]
            == (replies["mid"]["choices"][0]["message"]["content"])
        )

        missing = complete(client, "nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "model"
        assert "'small', 'mid', 'big'" in missing.json()["error"]["message"]

        # Each dialect and the token routes reach the named model.
        tokens = client.post("/tokenize", json={"content": "hi", "model": "big"})
        assert tokens.status_code == 200 and tokens.json()["tokens"]
        generated = client.post(
            "/api/generate",
            json={"model": "mid:latest", "prompt": "hi", "stream": False, "options": {"seed": 1}},
        )
        assert generated.status_code == 200 and generated.json()["model"] == "mid:latest"
        message = client.post(
            "/v1/messages",
            json={"model": "big", "max_tokens": 8, "messages": HI},
        )
        assert message.status_code == 200 and message.json()["model"] == "big"
        tags = [m["name"] for m in client.get("/api/tags").json()["models"]]
        assert tags == ["small:latest", "mid:latest", "big:latest"]
        ps = {m["name"]: m for m in client.get("/api/ps").json()["models"]}
        assert set(ps) == {"small:latest", "mid:latest", "big:latest"}
        assert ps["big:latest"]["size"] > ps["mid:latest"]["size"] > ps["small:latest"]["size"]


def test_two_models_stream_at_once(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path) as live, live.client() as client:
        assert complete(client, "mid").status_code == 200  # loaded
        small_worker = live.app.state.service.models.get("small").pool.workers[0]
        results: dict[str, Any] = {}

        def stream(name: str) -> None:
            with live.client() as own:
                with own.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={"model": name, "messages": HI, **GREEDY, "stream": True},
                ) as response:
                    results[name] = (response.status_code, response.read().decode())

        with paused(small_worker):
            slow = threading.Thread(target=stream, args=("small",))
            slow.start()
            eventually(lambda: client.get("/get_load").json()["models"]["small"]["processing"])
            # The default model is held mid-request; the other model answers meanwhile.
            stream("mid")
            assert results["mid"][0] == 200 and "[DONE]" in results["mid"][1]
            assert "small" not in results
        slow.join(30)
        assert results["small"][0] == 200 and "[DONE]" in results["small"][1]


def test_lru_eviction_under_a_memory_budget(shapes: dict[str, Path], tmp_path: Path) -> None:
    # small ~1 + mid ~7.6 fit in 17 MiB; adding big (~14.6) does not; big beside small does.
    with served(shapes, tmp_path, memory_budget_mib=17) as live, live.client() as client:
        assert complete(client, "mid").status_code == 200
        assert complete(client, "small").status_code == 200  # small used last: mid is LRU
        listing = client.get("/admin/models", headers=ADMIN).json()
        assert listing["memory"]["budget_mib"] == 17
        assert listing["memory"]["used_mib"] < 17
        assert complete(client, "big").status_code == 200
        assert states(client) == {"small": "loaded", "mid": "unloaded", "big": "loaded"}

        # Touch big, so small is the least recently used: loading mid evicts small only.
        assert complete(client, "big").status_code == 200
        assert complete(client, "mid").status_code == 200
        # small goes first (least recently used), then big, which mid does not fit beside.
        assert states(client) == {"small": "unloaded", "mid": "loaded", "big": "unloaded"}
        loaded = [m for m in client.get("/admin/models", headers=ADMIN).json()["models"]]
        used = sum(m["memory_mib"]["host"] for m in loaded if m["state"] == "loaded")
        assert used <= 17
        metrics = client.get("/metrics").text
        assert 'llamastream_model_loads_total{model="mid",outcome="unloaded"} 1.0' in metrics
        assert 'llamastream_model_loads_total{model="mid",outcome="loaded"} 2.0' in metrics


def test_a_model_too_big_even_alone_is_refused_with_the_reason(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    with served(shapes, tmp_path, memory_budget_mib=10) as live, live.client() as client:
        refused = complete(client, "big")
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["param"] == "model"
        assert "'big'" in error["message"] and "memory_budget_mib" in error["message"]
        assert "even alone" in error["message"]
        assert states(client) == {"small": "loaded", "mid": "unloaded", "big": "failed"}
        assert complete(client, "mid").status_code == 200  # the others keep serving


def test_no_unload_under_a_running_stream(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path, memory_budget_mib=17) as live, live.client() as client:
        assert complete(client, "mid").status_code == 200
        mid_worker = live.app.state.service.models.get("mid").pool.workers[0]
        results: dict[str, Any] = {}

        def ask(name: str) -> None:
            with live.client() as own:
                results[name] = complete(own, name)

        with paused(mid_worker):
            held = threading.Thread(target=ask, args=("mid",))
            held.start()
            eventually(lambda: client.get("/get_load").json()["models"]["mid"]["processing"])
            wanting = threading.Thread(target=ask, args=("big",))
            wanting.start()
            # big needs mid's memory: small (idle) goes, mid (busy) stays while its stream runs.
            eventually(lambda: states(client)["small"] == "unloaded")
            time.sleep(0.6)
            assert states(client)["mid"] == "loaded"
            assert states(client)["big"] == "loading"
            assert "big" not in results
        held.join(30)
        wanting.join(30)
        assert results["mid"].status_code == 200
        assert results["big"].status_code == 200, results["big"].text
        assert states(client) == {"small": "unloaded", "mid": "unloaded", "big": "loaded"}


def test_busy_models_hold_the_memory_past_the_queue_wait(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    with served(shapes, tmp_path, memory_budget_mib=17, max_queue_wait_s=0.5) as live:
        with live.client() as client:
            assert complete(client, "mid").status_code == 200
            mid_worker = live.app.state.service.models.get("mid").pool.workers[0]
            with paused(mid_worker):
                held = asking(live, "mid", [])
                eventually(lambda: client.get("/get_load").json()["models"]["mid"]["processing"])
                refused = complete(client, "big")
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "5"
                assert "busy model(s) mid" in refused.json()["error"]["message"]
            held.join(30)
            assert complete(client, "big").status_code == 200  # once mid is idle


def test_keep_alive_unloads_idle_models(shapes: dict[str, Path], tmp_path: Path) -> None:
    models = [{"name": "mid", "model_path": str(shapes["mid"]), "keep_alive_s": 0.5}]
    with served(shapes, tmp_path, models=models) as live, live.client() as client:
        assert complete(client, "mid").status_code == 200
        eventually(lambda: states(client)["mid"] == "unloaded", timeout=5)
        assert states(client)["small"] == "loaded"  # keep_alive_s -1 by default: kept
        # Ollama's keep_alive per request: 0 unloads as soon as the reply is done.
        assert client.post("/api/generate", json={"model": "small"}).json()["done_reason"] == (
            "load"
        )
        reply = client.post(
            "/api/generate",
            json={"model": "small", "prompt": "hi", "stream": False, "keep_alive": 0},
        )
        assert reply.status_code == 200
        eventually(lambda: states(client)["small"] == "unloaded", timeout=5)
        # An empty request with keep_alive 0 unloads at once; the next request loads again.
        assert complete(client, "mid").status_code == 200
        unloaded = client.post("/api/chat", json={"model": "mid", "keep_alive": 0})
        assert unloaded.json()["done_reason"] == "unload"
        assert states(client)["mid"] == "unloaded"
        # "-1": never expires (Ollama's spelling), reported as far ahead by /api/ps.
        client.post("/api/generate", json={"model": "mid", "keep_alive": -1})
        ps = client.get("/api/ps").json()["models"]
        assert [m["expires_at"][:4] for m in ps if m["name"] == "mid:latest"] == ["2318"]
        bad = client.post("/api/generate", json={"model": "mid", "keep_alive": "soon"})
        assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


def test_a_broken_model_file_is_503_naming_it_and_the_others_serve(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    models = [
        {"name": "broken", "model_path": str(broken)},
        {"name": "gone", "model_path": str(tmp_path / "missing.gguf")},
        {"name": "mid", "model_path": str(shapes["mid"])},
    ]
    with served(shapes, tmp_path, models=models) as live, live.client() as client:
        for name in ("broken", "gone"):
            response = complete(client, name)
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["param"] == "model" and f"'{name}' could not be loaded" in error["message"]
            assert "retry-after" not in response.headers  # waiting would not help
        assert "no such model file" in complete(client, "gone").json()["error"]["message"]
        assert states(client)["broken"] == "failed"
        listing = client.get("/admin/models", headers=ADMIN).json()["models"]
        assert [m.get("error", "")[:1] != "" for m in listing] == [False, True, True, False]
        assert complete(client, "mid").status_code == 200
        assert complete(client, None).status_code == 200
        # Native and Ollama families answer in their own envelopes.
        assert (
            client.post("/chat_stream", json={"user_input": "hi", "model": "gone"}).json()["field"]
            == "model"
        )
        ollama = client.post("/api/generate", json={"model": "broken", "prompt": "hi"})
        assert ollama.status_code == 503 and "'broken'" in ollama.json()["error"]


def test_requests_for_a_loading_model_wait_in_its_own_bounded_queue(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    models = [
        {
            "name": "mid",
            "model_path": str(shapes["mid"]),
            "num_of_concurrent_executions": 1,
            "max_queue_size": 1,
        }
    ]
    with served(shapes, tmp_path, models=models) as live, live.client() as client:
        registry = live.app.state.service.models
        loop = live.server_loop()
        lock = registry._load_lock
        asyncio.run_coroutine_threadsafe(lock.acquire(), loop).result(5)  # loads wait
        results: list[httpx.Response] = []
        threads = []
        try:
            threads = [asking(live, "mid", results) for _ in range(2)]
            eventually(lambda: registry.get("mid").leases == 2)
            full = complete(client, "mid")  # one slot + one place in the queue are taken
            assert full.status_code == 429 and full.headers["retry-after"] == "5"
            assert "'mid' is loading" in full.json()["error"]["message"]
            assert complete(client, None).status_code == 200  # the default is not held up
        finally:
            loop.call_soon_threadsafe(lock.release)
        for thread in threads:
            thread.join(30)
        assert [r.status_code for r in results] == [200, 200]


def test_admin_endpoints_load_unload_and_list(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path) as live, live.client() as client:
        assert client.get("/admin/models").status_code == 401
        assert client.post("/admin/models/load", json={"model": "mid"}).status_code == 401
        listing = client.post("/admin/models/load", json={"model": "mid"}, headers=ADMIN)
        assert listing.status_code == 200
        entries = {m["id"]: m for m in listing.json()["models"]}
        mid = entries["mid"]
        assert mid["state"] == "loaded" and mid["slots"] == 2 and mid["waiting"] == 0
        assert 7 < mid["memory_mib"]["host"] < 9 and mid["memory_mib"]["gpu"] == 0
        assert mid["load_seconds"] > 0 and mid["placement"] and mid["n_ctx"] == 512
        assert entries["big"]["state"] == "unloaded" and entries["big"]["aliases"] == ["large"]

        worker = live.app.state.service.models.get("mid").pool.workers[0]
        with paused(worker):
            held = asking(live, "mid", [])
            eventually(lambda: client.get("/get_load").json()["models"]["mid"]["processing"])
            busy = client.post("/admin/models/unload", json={"model": "mid"}, headers=ADMIN)
            assert busy.status_code == 409 and busy.json()["field"] == "model"
        held.join(30)
        done = client.post("/admin/models/unload", json={"model": "mid"}, headers=ADMIN)
        assert done.status_code == 200 and states(client)["mid"] == "unloaded"
        bad = client.post("/admin/models/load", json={"model": "mid", "x": 1}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["field"] == "x"
        unknown = client.post("/admin/models/load", json={"model": "zzz"}, headers=ADMIN)
        assert unknown.status_code == 404 and unknown.json()["field"] == "model"

        # Forced: the running request is stopped (as at shutdown), then the model unloaded.
        assert complete(client, "mid").status_code == 200
        worker = live.app.state.service.models.get("mid").pool.workers[0]
        stopped: list[httpx.Response] = []
        forced: list[httpx.Response] = []
        with paused(worker):
            held = asking(live, "mid", stopped)
            eventually(lambda: client.get("/get_load").json()["models"]["mid"]["processing"])

            def force() -> None:
                with live.client() as own:
                    body = {"model": "mid", "force": True}
                    forced.append(own.post("/admin/models/unload", json=body, headers=ADMIN))

            forcing = threading.Thread(target=force)
            forcing.start()
            time.sleep(0.3)  # the worker goes on after this step and sees the stop
        forcing.join(30)
        held.join(30)
        assert forced[0].status_code == 200
        assert stopped[0].status_code == 503 and "unloaded" in stopped[0].json()["error"]["message"]
        assert states(client)["mid"] == "unloaded"
        assert complete(client, "mid").status_code == 200  # loads again and serves


SECONDS = "llamastream_decode_step_seconds_total"


def test_per_model_metrics_and_load(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path) as live, live.client() as client:
        assert complete(client, "mid").status_code == 200
        assert complete(client, None).status_code == 200
        metrics = client.get("/metrics").text
        for name in ("small", "mid"):
            assert (
                f'llamastream_generations_total{{model="{name}",outcome="success",'
                'route="/v1/chat/completions"} 1.0'
            ) in metrics
            assert f'llamastream_model_loaded{{model="{name}"}} 1.0' in metrics
            assert f'llamastream_slots{{model="{name}"}} 2.0' in metrics
        assert 'llamastream_model_loaded{model="big"} 0.0' in metrics
        # The step counters of a model outlive its unload and grow on after a reload.
        steps = [metric(metrics, "llamastream_decode_steps_total", model="mid")]
        decode = [metric(metrics, SECONDS, model="mid", phase="decode")]
        assert steps[0] > 0 and decode[0] > 0
        unload = client.post("/admin/models/unload", json={"model": "mid"}, headers=ADMIN)
        assert unload.status_code == 200
        for _ in range(2):  # unloaded, then loaded again and used
            metrics = client.get("/metrics").text
            steps.append(metric(metrics, "llamastream_decode_steps_total", model="mid"))
            decode.append(metric(metrics, SECONDS, model="mid", phase="decode"))
            assert complete(client, "mid").status_code == 200
        assert steps[0] == steps[1] < steps[2] and decode[0] == decode[1] < decode[2]
        load = client.get("/get_load").json()
        assert load["max_processing"] == 6
        assert load["models"]["big"] == {
            "processing": 0,
            "waiting": 0,
            "max_processing": 2,
            "max_waiting": 4,
            "state": "unloaded",
        }


def test_the_session_keeps_its_model(shapes: dict[str, Path], tmp_path: Path) -> None:
    with served(shapes, tmp_path) as live, live.client() as client:
        listed = client.get("/get_models").json()
        assert listed["default"] == "small" and listed["model"] == "small"
        assert [(m["id"], m["state"]) for m in listed["models"]] == [
            ("small", "loaded"),
            ("mid", "unloaded"),
            ("big", "unloaded"),
        ]
        first = client.post("/chat_stream", json={"user_input": "hi"})
        assert first.status_code == 200
        chosen = client.post("/set_generation_params", json={"model": "mid", "temperature": 0})
        assert chosen.status_code == 200 and chosen.json()["model"] == "mid"
        assert client.get("/get_generation_params").json()["model"] == "mid"
        # Reading the conversation or showing a model loads nothing.
        unrendered = client.get("/get_prompt").json()
        assert unrendered["prompt"] is None and len(unrendered["messages"]) == 2
        shown = client.post("/api/show", json={"model": "mid"})
        assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"
        assert states(client)["mid"] == "unloaded"
        second = client.post("/chat_stream", json={"user_input": "again"})
        assert second.status_code == 200
        assert states(client)["mid"] == "loaded"
        assert client.get("/get_prompt").json()["model"] == "mid"
        assert client.get("/get_models").json()["model"] == "mid"
        # The history goes on with the other model; a turn may name a model (kept after).
        third = client.post("/chat_stream", json={"user_input": "more", "model": "large"})
        assert third.status_code == 200
        prompt = client.get("/get_prompt").json()
        assert prompt["model"] == "big"  # the alias given, the model's id kept
        assert client.get("/get_models").json()["model"] == "big"
        metrics = client.get("/metrics").text
        for name in ("small", "mid", "big"):  # each turn ran on the session's model then
            assert (
                f'llamastream_generations_total{{model="{name}",outcome="success",'
                'route="/chat_stream"} 1.0'
            ) in metrics
        assert [m["role"] for m in prompt["messages"]] == ["user", "assistant"] * 3
        bad = client.post("/set_generation_params", json={"model": "nope"})
        assert bad.status_code == 404 and bad.json()["field"] == "model"
        assert client.get("/get_generation_params").json()["model"] == "big"
        # Another session still has the default.
        with live.client() as other:
            assert other.get("/get_models").json()["model"] == "small"


def test_the_official_openai_client_switches_models(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    with served(shapes, tmp_path) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        try:
            ids = [m.id for m in client.models.list()]
            assert ids == ["small", "mid", "big"]
            for name in ("mid", "big", "small", "mid"):
                reply = client.chat.completions.create(
                    model=name,
                    messages=HI,
                    temperature=0,
                    max_tokens=4,  # type: ignore[arg-type]
                )
                assert reply.model == name
            stream = client.chat.completions.create(
                model="big",
                messages=HI,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=4,
                stream=True,
            )
            assert {chunk.model for chunk in stream} == {"big"}
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="nope", messages=HI)  # type: ignore[arg-type]
        finally:
            client.close()


def test_n_gpu_layers_auto_plans_against_a_device_budget(
    shapes: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No GPU here: device_memory_mib stands in for a card, so the plan is made and shown.
    models = [
        {"name": "mid", "model_path": str(shapes["mid"]), "n_gpu_layers": "auto"},
        {"name": "big", "model_path": str(shapes["big"]), "n_gpu_layers": "auto"},
    ]
    caplog.set_level(logging.INFO, logger="llamastream.engine.pool")
    with (
        served(shapes, tmp_path, models=models, device_memory_mib=10, gpu_headroom_mib=0) as live,
        live.client() as client,
    ):
        for name in ("mid", "big"):
            assert complete(client, name).status_code == 200
        entries = {m["id"]: m for m in client.get("/admin/models", headers=ADMIN).json()["models"]}
        assert entries["mid"]["gpu_layers_chosen"] == 3  # 2 layers + output: all fit in 10 MiB
        assert entries["mid"]["gpu_layers_advice"] == []
        big = entries["big"]
        assert 0 < big["gpu_layers_chosen"] < 5  # ~14.6 MiB: part of it
        assert big["gpu_layers_advice"], big
        assert any("n_ctx=" in line or "q8_0" in line for line in big["gpu_layers_advice"])
        assert any("n_gpu_layers auto" in r.getMessage() for r in caplog.records)


def test_models_from_a_config_file_and_a_models_dir(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "llamastream.toml"
    config.write_text(
        f'model_path = "{shapes["small"]}"\n'
        "n_ctx = 256\n"
        "max_new_tokens = 16\n"
        "[[models]]\n"
        'name = "coder"\n'
        f'model_path = "{shapes["mid"]}"\n'
        "n_ctx = 384\n"
        "num_of_concurrent_executions = 1\n"
        "temperature = 0.1\n"
        'aliases = ["code"]\n',
        encoding="utf-8",
    )
    settings = Settings(config_file=config, n_threads=1)
    assert settings.n_ctx == 256
    assert settings.models == [
        ModelConfig(
            name="coder",
            model_path=shapes["mid"],
            aliases=["code"],
            n_ctx=384,
            num_of_concurrent_executions=1,
            temperature=0.1,
        )
    ]
    assert Settings(config_file=config, n_ctx=300).n_ctx == 300  # flags win over the file
    with pytest.raises(ValueError, match="not a per-model setting"):
        ModelConfig(name="x", model_path="x.gguf", port=1)
    with pytest.raises(ValueError, match="exactly one of model_path and preset"):
        ModelConfig(name="x")

    dir_models = tmp_path / "dir"
    dir_models.mkdir()
    (dir_models / "extra.gguf").write_bytes(shapes["big"].read_bytes())
    app = create_app(
        settings,
        models_dir=dir_models,
        serve_models_dir=True,
        session_dir=tmp_path / "s",
    )
    with LiveServer(app) as live, live.client() as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["context_length"]) for m in listed] == [
            ("small", 256),
            ("coder", 384),
            ("extra", 256),
        ]
        assert complete(client, "code").json()["model"] == "coder"
        assert client.get("/get_load").json()["models"]["coder"]["max_processing"] == 1
        assert complete(client, "extra").status_code == 200
        wait_idle(client)


def test_command_line_flags_take_models_as_json(shapes: dict[str, Path], tmp_path: Path) -> None:
    from llamastream.cli import build_parser, settings_from_args

    models = [{"name": "mid", "model_path": str(shapes["mid"]), "n_ctx": 256}]
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(shapes["small"]),
            "--models",
            json.dumps(models),
            "--n-gpu-layers",
            "auto",
            "--model-aliases",
            "a, b",
            "--tensor-split",
            "3,1",
            "--memory-budget-mib",
            "64",
        ]
    )
    settings = settings_from_args(args)
    assert settings.models == [ModelConfig(**models[0])]
    assert settings.n_gpu_layers == "auto" and settings.memory_budget_mib == 64
    assert settings.model_aliases == ["a", "b"] and settings.tensor_split == [3.0, 1.0]
    one = settings_from_args(build_parser().parse_args(["serve", "--n-gpu-layers", "12"]))
    assert one.n_gpu_layers == 12


def test_idle_models_leave_the_gpu_to_a_model_that_would_not_fit_whole(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    # A 10 MiB pretend card: small (~1 MiB) and mid (~7.6) fit on it together; big (~14.6)
    # gets part of it, and more once idle models leave it.
    models = [
        {"name": "mid", "model_path": str(shapes["mid"])},
        {"name": "big", "model_path": str(shapes["big"])},
    ]
    with (
        served(shapes, tmp_path, models=models, device_memory_mib=10, gpu_headroom_mib=0) as live,
        live.client() as client,
    ):

        def listing() -> dict[str, Any]:
            entries = client.get("/admin/models", headers=ADMIN).json()["models"]
            return {m["id"]: m for m in entries}

        assert complete(client, "mid").status_code == 200
        both = listing()
        assert both["small"]["gpu_layers_chosen"] == 3 and both["mid"]["gpu_layers_chosen"] == 3
        assert both["small"]["state"] == both["mid"]["state"] == "loaded"  # side by side

        assert complete(client, "big").status_code == 200
        after = listing()
        # Both idle models left the card (least recently used first), so big got what a
        # card to itself gives it.
        assert after["small"]["state"] == after["mid"]["state"] == "unloaded"
        alone = after["big"]["gpu_layers_chosen"]
        client.post("/admin/models/unload", json={"model": "big"}, headers=ADMIN)
        reloaded = client.post("/admin/models/load", json={"model": "big"}, headers=ADMIN)
        assert {m["id"]: m for m in reloaded.json()["models"]}["big"]["gpu_layers_chosen"] == (
            alone
        )
        assert 0 < alone < 5

        # A busy model keeps its place on the card: big then gets what is left beside it.
        client.post("/admin/models/unload", json={"model": "big"}, headers=ADMIN)
        assert complete(client, "mid").status_code == 200
        worker = live.app.state.service.models.get("mid").pool.workers[0]
        with paused(worker):
            held = asking(live, "mid", [])
            eventually(lambda: client.get("/get_load").json()["models"]["mid"]["processing"])
            assert complete(client, "big").status_code == 200
            beside = listing()
            assert beside["mid"]["state"] == "loaded"
            assert beside["big"]["gpu_layers_chosen"] < alone
        held.join(30)


def test_a_model_bigger_than_the_host_is_refused_at_once(
    shapes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injected: a host with 4 MiB available. big (~14.6 MiB) cannot fit even if every
    # other model left: refused at once, with nothing unloaded for it.
    with served(shapes, tmp_path) as live, live.client() as client:
        monkeypatch.setattr("llamastream.registry.mem_available", lambda: 4 << 20)
        started = time.monotonic()
        refused = complete(client, "big")
        assert time.monotonic() - started < 5  # not max_queue_wait_s (60 s)
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        message = refused.json()["error"]["message"]
        assert "host's available memory even alone" in message, message
        assert states(client)["small"] == "loaded"


def test_auto_layers_split_a_device_between_its_workers(
    shapes: dict[str, Path], tmp_path: Path
) -> None:
    models = [{"name": "mid", "model_path": str(shapes["mid"]), "workers": 2}]
    with (
        served(shapes, tmp_path, models=models, device_memory_mib=10, gpu_headroom_mib=0) as live,
        live.client() as client,
    ):
        assert complete(client, "mid").status_code == 200
        mid = {m["id"]: m for m in client.get("/admin/models", headers=ADMIN).json()["models"]}
        placement = mid["mid"]["placement"]
        assert len(placement) == 2  # two workers, each with part of the card
        assert 0 < mid["mid"]["gpu_layers_chosen"] < 3
