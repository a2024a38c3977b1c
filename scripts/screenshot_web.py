"""Screenshot the chat page after a short real conversation (for the README).

    python scripts/screenshot_web.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --chat-template-file scripts/templates/chatml-think.jinja --reasoning-budget 10 \
        docs/chat.png

(the template makes the model think first, the budget closes its reasoning after 10 tokens;
the first reply's reasoning block is opened for the picture.)

Needs Debian's chromium and the `playwright` package (no browser download).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from llamastream import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--chat-template-file", type=Path)
    parser.add_argument("--reasoning-budget", type=int, default=-1)
    args = parser.parse_args()

    sessions = tempfile.mkdtemp()
    app = create_app(
        model_path=args.model,
        session_dir=sessions,
        temperature=0.2,
        max_new_tokens=120,
        seed=1,
        chat_template_file=args.chat_template_file,
        reasoning_budget=args.reasoning_budget,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(url)
        for question in ("What is the capital of France?", "List three facts about llamas."):
            page.fill("#input", question)
            page.press("#input", "Enter")
            page.wait_for_selector(".message.assistant:not(.streaming)")
            page.wait_for_function("document.body.dataset.busy === ''", timeout=60_000)
        first = page.locator(".message.assistant details.reasoning:not([hidden]) summary")
        if first.count():
            first.first.click()
        page.screenshot(path=str(args.out))
        browser.close()
    server.should_exit = True
    thread.join()
    print(args.out)


if __name__ == "__main__":
    main()
