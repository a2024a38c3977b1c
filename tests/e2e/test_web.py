"""The chat page in a real headless Chromium (Debian's), against a live server on the tiny model."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamastream import create_app
from tests import tool_templates
from tests.conftest import LiveServer, eventually, wait_idle, write_tiny_gguf
from tests.e2e.conftest import paused

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@contextlib.contextmanager
def page_on(browser: Any, settings_kwargs: dict[str, Any], **changes: Any) -> Iterator[Any]:
    app = create_app(**{**settings_kwargs, **changes})
    with LiveServer(app) as live:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(live.url + "/")
        page.app = app
        page.live = live
        try:
            yield page
        finally:
            context.close()
            with live.client() as probe:
                wait_idle(probe)


def bubbles(page: Any) -> list[tuple[str, str]]:
    pairs = page.eval_on_selector_all(
        ".message:not([hidden])",
        "els => els.map(e => [e.classList.contains('user') ? 'user' : 'assistant', e.dataset.raw])",
    )
    return [tuple(pair) for pair in pairs]


def stored(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("fetch('/get_prompt').then(r => r.json()).then(d => d.messages)")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply_done(page: Any) -> None:
    page.wait_for_selector(".message.assistant:not(.streaming)")
    page.wait_for_function("document.body.dataset.busy === ''")


def test_stream_reload_regenerate_clear(browser: Any, settings_kwargs: dict[str, Any]) -> None:
    with page_on(browser, settings_kwargs, max_new_tokens=48, seed=None) as page:
        send(page, "こんにちは、元気？")
        wait_reply_done(page)
        shown = bubbles(page)
        history = stored(page)
        assert shown == [(m["role"], m["content"]) for m in history]
        assert shown[0] == ("user", "こんにちは、元気？")

        page.reload()
        page.wait_for_selector(".message.assistant")
        assert bubbles(page) == shown

        page.click("#regenerate")
        wait_reply_done(page)
        after = stored(page)
        assert len(after) == 2 and after[1]["id"] != history[1]["id"]
        assert bubbles(page) == [(m["role"], m["content"]) for m in after]

        page.click("#clear")
        page.wait_for_function("document.querySelectorAll('.message').length === 0")
        assert stored(page) == []


def test_reply_streams_and_stop_aborts_it(browser: Any, settings_kwargs: dict[str, Any]) -> None:
    growing = (
        "n => { const b = document.querySelector('.message.assistant.streaming');"
        " return b && b.dataset.raw.length > n ? b.dataset.raw.length : false; }"
    )
    with page_on(browser, settings_kwargs, n_ctx=8192, max_new_tokens=8000) as page:
        send(page, "a long story please")
        # The reply is shown while it grows, before it has ended.
        seen = page.wait_for_function(growing, arg=20).json_value()
        page.wait_for_function(growing, arg=seen + 20)
        page.click("#stop")
        page.wait_for_selector(".message.assistant.partial")
        with page.live.client() as probe:
            wait_idle(probe, timeout=10)
        last = stored(page)[-1]
        assert last["partial"] is True  # cut short by the client leaving, not finished


def test_busy_server_is_announced_and_retried(
    browser: Any, settings_kwargs: dict[str, Any]
) -> None:
    with page_on(
        browser, settings_kwargs, num_of_concurrent_executions=1, max_queue_size=0
    ) as page:
        pool = page.app.state.service.pool
        with paused(pool.workers[0]):
            holder = threading.Thread(
                target=lambda: httpx.post(
                    page.live.url + "/chat_stream", json={"user_input": "x"}, timeout=30
                )
            )
            holder.start()
            eventually(lambda: page.app.state.service.slots.load().processing == 1)
            send(page, "hello?")
            page.wait_for_selector("#notice:not([hidden])")
            assert "busy" in page.inner_text("#notice")
        holder.join(10)
        wait_reply_done(page)  # the page retried after Retry-After by itself
        assert [role for role, _ in bubbles(page)] == ["user", "assistant"]


def test_enter_while_composing_does_not_send(browser: Any, settings_kwargs: dict[str, Any]) -> None:
    with page_on(browser, settings_kwargs) as page:
        page.fill("#input", "にほんご")
        page.evaluate(
            """() => document.getElementById('input').dispatchEvent(new KeyboardEvent(
                'keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))"""
        )
        page.wait_for_timeout(300)
        assert bubbles(page) == []
        assert page.input_value("#input") == "にほんご"


def test_generation_params_are_bound(browser: Any, settings_kwargs: dict[str, Any]) -> None:
    with page_on(browser, settings_kwargs) as page:
        page.click("#settings-toggle")
        page.wait_for_function("document.getElementById('temperature').value !== ''")
        # One model: its picker stays hidden, so the page looks as it always has.
        page.wait_for_function("document.getElementById('model-picker').options.length === 1")
        assert page.is_hidden("#model-choice")
        page.fill("#temperature", "0.25")
        page.dispatch_event("#temperature", "change")
        page.wait_for_function("document.getElementById('settings-status').textContent === 'Saved'")
        params = page.evaluate("fetch('/get_generation_params').then(r => r.json())")
        assert params["temperature"] == 0.25
        page.fill("#max_new_tokens", "999999")
        page.dispatch_event("#max_new_tokens", "change")
        page.wait_for_function("document.getElementById('settings-status').textContent !== 'Saved'")
        assert "max_new_tokens" in page.inner_text("#settings-status")


def test_model_picker_chooses_the_sessions_model(
    browser: Any, settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    second = write_tiny_gguf(tmp_path / "second.gguf", n_embd=64, n_layer=2, seed=7)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)  # found, but not a model
    options = (
        "() => [...document.querySelectorAll('#model-picker option')]"
        ".map(o => [o.value, o.textContent, o.selected])"
    )
    models = "fetch('/get_models').then(r => r.json())"
    with page_on(
        browser,
        settings_kwargs,
        max_new_tokens=16,
        models=[
            {"name": "second", "model_path": str(second)},
            {"name": "broken", "model_path": str(broken)},
        ],
    ) as page:
        page.wait_for_selector("#model-picker option[value=second]", state="attached")
        assert page.is_visible("#model-choice")
        assert page.evaluate(
            "() => { const s = document.getElementById('model-picker');"
            " return s.labels.length === 1 && s.labels[0].textContent.includes('Model'); }"
        )
        default = page.evaluate(models)["default"]
        assert page.evaluate(options) == [
            [default, f"{default} — loaded", True],
            ["second", "second — unloaded", False],
            ["broken", "broken — unloaded", False],
        ]

        page.select_option("#model-picker", "second")
        # Once the choice is saved the picker is enabled again (the test's own request then
        # carries the cookie the page holds: asked meanwhile, on a session not yet stored, it
        # would be issued a new one).
        page.wait_for_function("() => !document.getElementById('model-picker').disabled")
        assert page.evaluate(models)["model"] == "second"
        # The picker is disabled while the turn runs, as the other controls are.
        page.evaluate(
            """() => { window.pickerWhileBusy = [];
                new MutationObserver(() => { if (document.body.dataset.busy)
                    window.pickerWhileBusy.push(document.getElementById('model-picker').disabled);
                }).observe(document.body, {attributes: true, attributeFilter: ['data-busy']}); }"""
        )
        send(page, "hello, second model")
        wait_reply_done(page)
        assert page.evaluate("window.pickerWhileBusy") == [True]
        assert page.is_enabled("#model-picker")
        assert page.locator("#notice").is_hidden()
        history = stored(page)
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert bubbles(page) == [(m["role"], m["content"]) for m in history]

        # The list is refreshed after the turn: the turn loaded "second".
        page.wait_for_function(
            "() => [...document.querySelectorAll('#model-picker option')]"
            ".some(o => o.value === 'second' && o.textContent === 'second — loaded')"
        )
        assert page.evaluate(options) == [
            [default, f"{default} — loaded", False],
            ["second", "second — loaded", True],
            ["broken", "broken — unloaded", False],
        ]

        # A refused choice is told in the notice, and the picker shows the session's model.
        page.evaluate(
            """() => { const o = document.createElement('option');
                o.value = 'nope'; o.textContent = 'nope';
                document.getElementById('model-picker').appendChild(o); }"""
        )
        page.select_option("#model-picker", "nope")
        page.wait_for_selector("#notice:not([hidden])")
        assert "nope" in page.inner_text("#notice")
        page.wait_for_function("document.getElementById('model-picker').value === 'second'")

        # A model that cannot be loaded: its error is told, not retried as "busy".
        page.select_option("#model-picker", "broken")
        eventually(lambda: page.evaluate(models)["model"] == "broken")
        send(page, "anyone there?")
        page.wait_for_function("document.body.dataset.busy === ''")
        assert "broken" in page.inner_text("#notice")
        assert "busy" not in page.inner_text("#notice")
        assert page.input_value("#input") == "anyone there?"
        assert len(bubbles(page)) == 2
        page.wait_for_selector("#model-picker option[value=broken]", state="attached")
        page.wait_for_function(
            "document.querySelector('#model-picker option[value=broken]').textContent"
            " === 'broken — failed'"
        )
        page.select_option("#model-picker", "second")
        # Once the choice is saved the picker is enabled again (the test's own request then
        # carries the cookie the page holds: asked meanwhile, on a session not yet stored, it
        # would be issued a new one).
        page.wait_for_function("() => !document.getElementById('model-picker').disabled")
        assert page.evaluate(models)["model"] == "second"

        page.reload()
        page.wait_for_selector("#model-picker option[value=second]", state="attached")
        page.wait_for_function("document.getElementById('model-picker').value === 'second'")
        assert page.evaluate(options)[1:] == [
            ["second", "second — loaded", True],
            ["broken", "broken — failed", False],
        ]
        # Focusing the picker refreshes it.
        page.evaluate("document.querySelector('#model-picker option').textContent = 'stale'")
        page.focus("#model-picker")
        page.wait_for_function(
            "document.querySelector('#model-picker option').textContent !== 'stale'"
        )
        data = page.evaluate(models)
        assert data["model"] == "second"
        assert {m["id"]: m["state"] for m in data["models"]} == {
            default: "loaded",
            "second": "loaded",
            "broken": "failed",
        }
        page.set_viewport_size({"width": 375, "height": 700})
        for selector in ("#model-picker", "#settings-toggle"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
        assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_markdown_cannot_inject_html(browser: Any, settings_kwargs: dict[str, Any]) -> None:
    with page_on(browser, settings_kwargs) as page:
        html = page.evaluate(
            """renderMarkdown('<img src=x onerror=alert(1)> **bold** `<b>` [x](javascript:alert(1))'
               + '\\n\\n```\\n<script>alert(2)</script>\\n```\\n- item [ok](https://example.org/a)')"""
        )
        assert "<img" not in html and "<script" not in html and "<b>" not in html
        assert "&lt;img" in html and "&lt;script&gt;" in html
        assert "<strong>bold</strong>" in html
        assert 'href="javascript' not in html
        assert '<a href="https://example.org/a" target="_blank" rel="noopener noreferrer">' in html


def test_phone_width(browser: Any, settings_kwargs: dict[str, Any], tmp_path: Path) -> None:
    with page_on(browser, settings_kwargs, max_new_tokens=16) as page:
        page.set_viewport_size({"width": 375, "height": 700})
        send(page, "hi from a phone")
        wait_reply_done(page)
        for selector in ("#send", "#regenerate", "#clear", "#input", "#settings-toggle"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / "phone.png"))


def test_reasoning_shows_collapsed_apart_from_the_answer(
    browser: Any, settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "thinking.gguf", chat_template=tool_templates.THINKING)
    thinking = (
        "() => { const b = document.querySelector('.message.assistant.streaming');"
        " return b && b.dataset.reasoning.length > 20; }"
    )
    shown = (
        "() => { const b = document.querySelector('.message.assistant');"
        " const d = b.querySelector('details.reasoning');"
        " return {hidden: d.hidden, open: d.open, summary: d.querySelector('summary').textContent,"
        " thought: d.querySelector('.thought').textContent, answer: b.dataset.raw}; }"
    )
    # A reply long enough to be stopped while it streams (the tiny model writes 1,500 tokens
    # in about a second: it could end before the click).
    with page_on(
        browser, settings_kwargs, model_path=model, n_ctx=8192, max_new_tokens=8000
    ) as page:
        send(page, "Think hard.")
        # While it streams, the reasoning grows in a collapsed block, apart from the answer.
        page.wait_for_function(thinking)
        during = page.evaluate(shown)
        assert during["hidden"] is False and during["open"] is False
        assert during["summary"] == "Thinking…" and during["answer"] == ""
        page.click("#stop")
        page.wait_for_selector(".message.assistant.partial")
    with page_on(
        browser, settings_kwargs, model_path=model, reasoning_budget=6, max_new_tokens=24
    ) as page:
        send(page, "Think briefly.")
        wait_reply_done(page)
        after = page.evaluate(shown)
        last = stored(page)[-1]
        assert after["summary"] == "Reasoning" and after["open"] is False
        assert (after["thought"], after["answer"]) == (last["reasoning"], last["content"])
        assert last["reasoning"] and last["content"]
        page.reload()
        page.wait_for_selector(".message.assistant")
        assert page.evaluate(shown) == after  # the history shows it the same way
