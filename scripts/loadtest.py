"""Load test: many streaming chats against a real `llamastream serve`, some clients leaving early.

Starts the server itself on a free 127.0.0.1 port (the tiny random-weight test model unless
``--model`` is given, sessions in a temp dir), warms it up, then sends ``--requests`` requests
from ``--concurrency`` clients: mostly ``/chat_stream`` turns in the client's own cookie
session (now and then a fresh one), some ``/v1/chat/completions`` with ``stream: true``.
``--disconnect`` of them leave at a random point: before the response, right after its
headers, or mid-stream after a few bytes. A refused client (429, 503, or 409 while its
previous, abandoned turn is still being settled) waits a moment, up to ``--backoff`` seconds,
and goes on.

Reports what the clients saw (completed, refused, disconnected, session busy, other 4xx, 5xx,
transport errors), what the server counted (``/metrics``), whether every slot is free again
afterwards (``/health``), and the server's resident memory after warm-up and after the run.

    python scripts/loadtest.py                       # 2,000 requests x 64, 4 slots, queue 16
    python scripts/loadtest.py --requests 40 --concurrency 8 --slots 2 --queue 2
    python scripts/loadtest.py --output docs/loadtest.md

Exits non-zero when any response was a 5xx, a slot is still busy after the run, or the server
died. Bounded: every request has a timeout, and the run stops after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine  # noqa: E402
from make_tiny_gguf import write_tiny_gguf  # noqa: E402

COOKIE = "llamastream_session"
INPUTS = [
    "Hello! Who are you?",
    "Tell me about llamas.",
    "日本語で自己紹介してください。",
    "Write a haiku about the sea 🌊",
    "What is a stream?",
    "Summarize our chat so far.",
]
DISCONNECT_MODES = ("before_response", "after_headers", "mid_stream")


# the server


@dataclass
class Server:
    """A `llamastream serve` process on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    command: list[str]

    def rss_mib(self) -> float:
        """Resident memory of the server process (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(
    workdir: Path,
    *,
    model: Path | None = None,
    slots: int = 4,
    queue: int = 16,
    extra: list[str] | None = None,
    start_timeout: float = 120.0,
) -> Iterator[Server]:
    """Run `python -m llamastream serve` on a free loopback port until /health answers 200.

    Without ``model``, the tiny random-weight test model is written into ``workdir``.
    Stopped with SIGTERM (the server drains), then killed if it lingers.
    """
    if model is None:
        model = write_tiny_gguf(workdir / "tiny.gguf")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llamastream",
        "serve",
        "--model",
        str(model),
        "--slots",
        str(slots),
        "--queue",
        str(queue),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--session-dir",
        str(workdir / "sessions"),
        "--log-level",
        "warning",
        *(extra or []),
    ]
    log = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASTREAM_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log, command)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{server.log_text()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{server.log_text()[-4000:]}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def header(title: str) -> str:
    """The top of a report: the exact command, the date and the machine."""
    command = shlex.join(["python", *sys.argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"# {title}\n\n    {command}\n\n{date}; {machine()}.\n\n"


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` in a Prometheus exposition, by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def metric_deltas(before: str, after: str, name: str) -> list[tuple[dict[str, str], float]]:
    """How much each sample of a counter grew between two expositions."""
    old = metric_samples(before, name)
    return [
        (dict(labels), value - old.get(labels, 0.0))
        for labels, value in sorted(metric_samples(after, name).items())
        if value - old.get(labels, 0.0)
    ]


# the clients


@dataclass
class Tally:
    """What the clients saw."""

    issued: int = 0
    completed: int = 0
    refused_429: int = 0
    refused_503: int = 0
    disconnected: Counter[str] = field(default_factory=Counter)
    session_busy: int = 0
    other_4xx: Counter[int] = field(default_factory=Counter)
    server_errors: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    aborted_at_deadline: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    bytes_read: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


@dataclass
class Plan:
    """One request: where it goes, with which session, and whether the client leaves early."""

    route: str
    fresh_session: bool
    disconnect: str | None
    after_bytes: int
    before_s: float


class Client:
    """One of the concurrent clients: its own session cookie, one request at a time."""

    def __init__(self, http: httpx.AsyncClient, args: argparse.Namespace, model_id: str) -> None:
        self.http = http
        self.args = args
        self.model_id = model_id
        self.session: str | None = None

    def plan(self, rng: random.Random) -> Plan:
        route = "/v1/chat/completions" if rng.random() < self.args.openai_share else "/chat_stream"
        leaves = rng.random() < self.args.disconnect
        return Plan(
            route=route,
            fresh_session=rng.random() < self.args.fresh_sessions,
            disconnect=rng.choice(DISCONNECT_MODES) if leaves else None,
            after_bytes=rng.randint(1, 48),
            before_s=rng.uniform(0.0, 0.05),
        )

    async def run(self, plan: Plan, tally: Tally, rng: random.Random) -> None:
        """Send one request and count what came back."""
        tally.routes[plan.route] += 1
        if plan.disconnect == "before_response":
            try:
                await asyncio.wait_for(self._send(plan, tally, rng), plan.before_s)
            except asyncio.TimeoutError:
                tally.disconnected["before_response"] += 1
            return
        await self._send(plan, tally, rng)

    async def _send(self, plan: Plan, tally: Tally, rng: random.Random) -> None:
        text = rng.choice(INPUTS)
        headers = {}
        if plan.route == "/chat_stream":
            body: dict[str, Any] = {"user_input": text}
            if plan.fresh_session:
                self.session = None
            if self.session:
                headers["cookie"] = f"{COOKIE}={self.session}"
        else:
            body = {
                "model": self.model_id,
                "messages": [{"role": "user", "content": text}],
                "stream": True,
                "max_tokens": self.args.max_new_tokens,
            }
        try:
            async with self.http.stream("POST", plan.route, json=body, headers=headers) as r:
                if plan.route == "/chat_stream":
                    self._keep_cookie(r)
                if r.status_code != 200:
                    await r.aread()
                    self._count_refusal(r, tally)
                    if r.status_code in (409, 429, 503):
                        await asyncio.sleep(rng.uniform(0, self.args.backoff))
                    return
                if plan.disconnect == "after_headers":
                    tally.disconnected["after_headers"] += 1
                    return
                data = b""
                async for chunk in r.aiter_raw():
                    data += chunk
                    if plan.disconnect == "mid_stream" and len(data) >= plan.after_bytes:
                        tally.bytes_read += len(data)
                        tally.disconnected["mid_stream"] += 1
                        return
                tally.bytes_read += len(data)
                if self._intact(plan, data):
                    tally.completed += 1
                else:
                    tally.malformed += 1
                    tally.note(f"malformed {plan.route} body: {data[-200:]!r}")
        except httpx.TransportError as exc:
            tally.transport_errors[type(exc).__name__] += 1
            tally.note(f"{plan.route}: {type(exc).__name__}: {exc}")

    def _keep_cookie(self, response: httpx.Response) -> None:
        for value in response.headers.get_list("set-cookie"):
            name, _, rest = value.partition("=")
            if name.strip() == COOKIE:
                self.session = rest.split(";", 1)[0]

    def _count_refusal(self, response: httpx.Response, tally: Tally) -> None:
        status = response.status_code
        if status == 429:
            tally.refused_429 += 1
        elif status == 503:
            tally.refused_503 += 1
        elif status == 409:
            tally.session_busy += 1
        elif 400 <= status < 500:
            tally.other_4xx[status] += 1
            tally.note(f"{status}: {response.text[:200]}")
        else:
            tally.server_errors[status] += 1
            tally.note(f"{status}: {response.text[:200]}")

    @staticmethod
    def _intact(plan: Plan, data: bytes) -> bool:
        """A whole reply: valid UTF-8 text, and for SSE the closing ``[DONE]``."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return False
        return plan.route == "/chat_stream" or text.endswith("data: [DONE]\n\n")


async def drive(url: str, args: argparse.Namespace, model_id: str, tally: Tally) -> float:
    """Send the requests from ``args.concurrency`` clients; return the seconds it took."""
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    rng = random.Random(args.seed)
    started = time.monotonic()
    deadline = started + args.max_seconds
    # Each client keeps its own cookie: the shared client must not keep any.
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, cookies=no_cookies
    ) as session:

        async def client_loop() -> None:
            client = Client(session, args, model_id)
            while tally.issued < args.requests and time.monotonic() < deadline:
                tally.issued += 1
                await client.run(client.plan(rng), tally, rng)

        tasks = [asyncio.create_task(client_loop()) for _ in range(args.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_seconds + 30)
        for task in pending:
            task.cancel()
        tally.aborted_at_deadline = len(pending)
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    return time.monotonic() - started


# the run


def warm_up(server: Server, model_id: str, slots: int) -> None:
    """One of each request per slot, so the memory figure before is past first-use growth."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(slots):
            client.post("/chat_stream", json={"user_input": f"warm-up {i}"}).raise_for_status()
            body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
            client.post("/v1/chat/completions", json={**body, "stream": True}).raise_for_status()


def wait_idle(url: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll /health until nothing is processing or waiting; the last figures and the wait."""
    started = time.monotonic()
    while True:
        load: dict[str, Any] = httpx.get(url + "/health", timeout=5).json()
        waited = time.monotonic() - started
        if (load["processing"] == 0 and load["waiting"] == 0) or waited > timeout:
            return load, waited
        time.sleep(0.05)


def report(
    args: argparse.Namespace,
    tally: Tally,
    wall: float,
    idle: dict[str, Any],
    idle_after: float,
    rss: tuple[float, float],
    metrics: tuple[str, str],
    server_alive: bool,
    log_text: str,
) -> tuple[str, bool]:
    """The Markdown tables and whether the run passed."""
    five_xx = sum(tally.server_errors.values())
    idle_now = idle.get("processing") == 0 and idle.get("waiting") == 0
    passed = five_xx == 0 and idle_now and server_alive
    disconnected = sum(tally.disconnected.values())
    by_mode = ", ".join(f"{m.replace('_', ' ')} {tally.disconnected[m]}" for m in DISCONNECT_MODES)
    rows = [
        ("requests sent", f"{tally.issued} of {args.requests} in {wall:.1f} s"),
        ("routes", ", ".join(f"{r} {n}" for r, n in sorted(tally.routes.items()))),
        ("completed (200, read to the end, intact)", tally.completed),
        ("refused 429 (queue full)", tally.refused_429),
        ("refused 503 (queue wait timeout / not ready)", tally.refused_503),
        ("disconnected by the client", f"{disconnected} ({by_mode})"),
        ("409 session busy", tally.session_busy),
        ("other 4xx", _counts(tally.other_4xx)),
        ("**5xx**", f"**{five_xx}**" + (f" ({_counts(tally.server_errors)})" if five_xx else "")),
        ("transport errors (broken streams)", _counts(tally.transport_errors)),
        ("200 but not intact", tally.malformed),
        ("clients stopped at --max-seconds", tally.aborted_at_deadline),
        (
            "**slots busy / queued after the run**",
            f"**{idle.get('processing', '?')} / {idle.get('waiting', '?')}**"
            + (f" (idle {idle_after:.2f} s after)" if idle_now else ""),
        ),
        ("server RSS after warm-up", f"{rss[0]:.1f} MiB"),
        ("server RSS after the run", f"{rss[1]:.1f} MiB ({rss[1] - rss[0]:+.1f} MiB)"),
        ("server still running", "yes" if server_alive else "**no**"),
        ("tracebacks in the server log", log_text.count("Traceback")),
    ]
    out = ["| client side | |", "|---|---:|"]
    out += [f"| {name} | {value} |" for name, value in rows]
    out += ["", "| server side (/metrics, this run only) | |", "|---|---:|"]
    for labels, value in metric_deltas(*metrics, "llamastream_generations_total"):
        out.append(f"| generations {labels.get('route')} {labels.get('outcome')} | {value:.0f} |")
    statuses: Counter[str] = Counter()
    for labels, value in metric_deltas(*metrics, "llamastream_http_requests_total"):
        if labels.get("route") in ("/chat_stream", "/v1/chat/completions"):
            statuses[labels.get("status", "?")] += int(value)
    for status, count in sorted(statuses.items()):
        out.append(f"| HTTP {status} on the chat routes | {count} |")
    out.append(f"| **result** | **{'pass' if passed else 'FAIL'}** |")
    if tally.examples:
        out += ["", "Examples of what went wrong:", ""]
        out += [f"- `{e}`" for e in tally.examples]
    return "\n".join(out) + "\n", passed


def _counts(counter: Counter[Any]) -> str:
    total = sum(counter.values())
    if not total:
        return "0"
    return f"{total} ({', '.join(f'{k}: {v}' for k, v in sorted(counter.items()))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=512, help="context of each slot")
    parser.add_argument(
        "--disconnect", type=float, default=0.1, help="share of clients that leave early"
    )
    parser.add_argument(
        "--openai-share", type=float, default=0.2, help="share sent to /v1/chat/completions"
    )
    parser.add_argument(
        "--fresh-sessions", type=float, default=0.1, help="share of chats in a new session"
    )
    parser.add_argument(
        "--backoff", type=float, default=0.25, help="most seconds a refused client waits"
    )
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `llamastream serve` argument (repeat; e.g. --server-arg=--max-queue-wait-s=5)",
    )
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args = parser.parse_args(argv)

    extra = [
        "--n-ctx",
        str(args.n_ctx),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--n-threads",
        "1",
        "--shutdown-grace-s",
        "5",
        *args.server_arg,
    ]
    with tempfile.TemporaryDirectory(prefix="llamastream-loadtest-") as tmp:
        with served(
            Path(tmp), model=args.model, slots=args.slots, queue=args.queue, extra=extra
        ) as server:
            model_id = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            warm_up(server, model_id, args.slots)
            wait_idle(server.url, 10)
            rss_before = server.rss_mib()
            metrics_before = httpx.get(server.url + "/metrics", timeout=10).text
            print(
                f"server {server.url} up (pid {server.proc.pid}, {rss_before:.1f} MiB); "
                f"{args.requests} requests x {args.concurrency} clients...",
                file=sys.stderr,
            )
            tally = Tally()
            wall = asyncio.run(drive(server.url, args, model_id, tally))
            alive = server.proc.poll() is None
            idle, idle_after = wait_idle(server.url, 10) if alive else ({}, 0.0)
            metrics = httpx.get(server.url + "/metrics", timeout=10).text if alive else ""
            rss_after = server.rss_mib() if alive else float("nan")
            log_text = server.log_text()
            if args.server_log:
                args.server_log.write_text(log_text)
    table, passed = report(
        args,
        tally,
        wall,
        idle,
        idle_after,
        (rss_before, rss_after),
        (metrics_before, metrics),
        alive,
        log_text,
    )
    settings = (
        f"{args.requests} requests, {args.concurrency} concurrent clients, {args.slots} slots, "
        f"queue {args.queue}, {args.max_new_tokens} new tokens at most, "
        f"{args.disconnect:.0%} of clients leaving early, model "
        f"{args.model.name if args.model else 'tiny random-weight test model'}.\n\n"
    )
    print(settings + table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(header("llamastream load test") + settings + table)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
