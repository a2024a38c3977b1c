"""Side-by-side benchmark: llamastream against llama-cpp-python and llama.cpp's llama-server.

Every server is started here, on 127.0.0.1, with the same model and settings, and measured one
after another in this one run, so the figures compare. Each is driven with streaming chat
requests of ``--tokens`` generated tokens (end-of-sequence suppressed) at each concurrency:
aggregate completion tokens/s, TTFT p50/p95, broken and refused streams. A multi-turn run then
replays ``--conversations`` conversations of ``--turns`` turns, round-robin, each turn resending
the whole history, and compares the time to first token of the last turn with the first.

    python scripts/bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/bench.py --llama-server /path/to/llama-server --concurrency 1 4 8 16

Writes ``docs/benchmarks/<name>.md`` (the command and the machine at the top) and a PNG chart.
Needs ``pip install -e '.[bench]'``. Bounded: every request has a timeout, every level a count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llamastream.chat.templates import ChatTemplate
from llamastream.engine.threads import CpuSet

ROOT = Path(__file__).resolve().parent.parent
# The same sampling work for every server: greedy, no repetition penalty (llama-server's
# default; llamastream's and llama-cpp-python's default penalty is 1.1).
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
TOPICS = ["a lighthouse", "a robot", "the sea", "a mountain", "a library", "a city", "a garden"]


@dataclass
class Level:
    """The figures of one server at one concurrency."""

    concurrency: int
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    broken: int = 0
    refused: int = 0
    requests: int = 0
    # llamastream's step timers over the level (`/metrics` deltas), or llama-server's timing
    # log: generation and prompt milliseconds and tokens of its requests.
    steps: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # CPU seconds over the level: the server's busiest threads (its decoding threads), the
    # rest of the server, and this benchmark's own process (the client).
    cpu: dict[str, float] = field(default_factory=dict)

    rates: list[float] = field(default_factory=list)  # each repeat's, once merged

    @property
    def rate(self) -> float:
        """Aggregate tokens/s: the median over the repeats once merged."""
        if self.rates:
            return statistics.median(self.rates)
        return self.tokens / self.wall if self.wall else 0.0


def merge(levels: list[Level]) -> Level:
    """One level's repeats as one: the median rate, every TTFT, counts and timers summed."""
    out = Level(levels[0].concurrency, rates=[lv.rate for lv in levels])
    for lv in levels:
        out.tokens += lv.tokens
        out.wall += lv.wall
        out.ttft += lv.ttft
        out.broken += lv.broken
        out.refused += lv.refused
        out.requests += lv.requests
        for mine, theirs in ((out.steps, lv.steps), (out.timings, lv.timings), (out.cpu, lv.cpu)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0.0) + value
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eog_tokens(model: Path) -> list[int]:
    import llama_cpp

    vocab_model = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    vocab = vocab_model._model.vocab
    ids = [
        t
        for t in range(llama_cpp.llama_vocab_n_tokens(vocab))
        if llama_cpp.llama_vocab_is_eog(vocab, t)
    ]
    vocab_model.close()
    return ids


@contextlib.contextmanager
def server(
    name: str, args: list[str], port: int, log_dir: Path, cwd: Path = ROOT
) -> Iterator[tuple[str, int]]:
    """Run a server (its output in ``log_dir/<name>.log``) until it answers; its URL and
    process id."""
    log = (log_dir / f"{name}.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[str, float | None, int, str]:
    """One streaming chat request: (outcome, ttft, completion tokens, text)."""
    start = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    text = []
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code in (429, 503):
                return "refused", None, 0, ""
            if r.status_code != 200:
                return "broken", None, 0, ""
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        chunks += 1
                        text.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError):
        return "broken", ttft, chunks, "".join(text)
    tokens = usage_tokens if usage_tokens is not None else chunks
    return ("ok" if done else "broken"), ttft, tokens, "".join(text)


# The input-grounded task's text: a reply that repeats and edits it is what prompt lookup
# drafts from.
PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens until it shone, and wrote the weather in his logbook: wind "
    "from the north-west, a light swell, visibility good. Ships passed far out at sea, their "
    "lamps like slow stars, and none of them ever knew his name. In the morning he climbed "
    "down again, made tea, fed the gulls that waited on the rail, and slept until the light "
    "was needed once more."
)


def request_body(i: int, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``i``-th request of a level: a prompt of its own (the number is in it)."""
    topic = TOPICS[i % len(TOPICS)]
    content = f"Story {i}: tell me a long, detailed story about {topic}."
    if args.task == "echo":
        content = (
            f"Text {i}. Rewrite this text word for word, changing only 'lighthouse' to "
            f"'{topic}', then go on:\n\n{PASSAGE}"
        )
    return {
        "model": args.model_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.tokens,
        **GREEDY,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


STEP_FAMILIES = {
    "llamastream_decode_steps": "steps",
    "llamastream_decode_step_tokens": "tokens",
    "llamastream_decode_step_slots": "slots",
    "llamastream_decode_step_runs": "runs",
    "llamastream_stream_events": "events",
    "llamastream_stream_event_wait_seconds": "event_wait",
}
TIMING = re.compile(r"\| +(prompt eval|eval) time = +([\d.]+) ms / +(\d+) tokens")


def step_counters(url: str) -> dict[str, float]:
    """llamastream's decode-step counters from `/metrics`, summed over models (empty for a
    server without them)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200 or "llamastream_decode_steps" not in response.text:
        return {}
    text = response.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in STEP_FAMILIES and sample.name.endswith("_total"):
                key = STEP_FAMILIES[family.name]
            elif family.name == "llamastream_decode_step_seconds":
                key = sample.labels.get("phase", "")
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of process ``pid`` so far (Linux's ``/proc``; empty where
    there is none)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # from the state, field 3, on
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def cpu_split(before: dict[int, float], after: dict[int, float], decoding: int) -> dict[str, float]:
    """CPU seconds between two `thread_cpu` readings: the ``decoding`` busiest threads (a
    CPU server's decode threads) and the rest of the process."""
    spent = sorted((cpu - before.get(tid, 0.0) for tid, cpu in after.items()), reverse=True)
    return {"decode": sum(spent[:decoding]), "rest": sum(spent[decoding:])}


def server_timings(log: str) -> dict[str, float]:
    """llama-server's own timing lines (one pair per request): generation and prompt
    milliseconds and tokens, summed."""
    out = {"eval_ms": 0.0, "eval_tokens": 0.0, "prompt_ms": 0.0, "prompt_tokens": 0.0}
    for kind, ms, tokens in TIMING.findall(log):
        prefix = "prompt" if kind == "prompt eval" else "eval"
        out[f"{prefix}_ms"] += float(ms)
        out[f"{prefix}_tokens"] += int(tokens)
    return out


async def measure_level(
    url: str,
    c: int,
    args: argparse.Namespace,
    extra: dict[str, Any],
    log: Path | None = None,
    first: int | None = None,
    pid: int | None = None,
) -> Level:
    """``c`` clients, ``args.rounds`` requests each; with the server's step counters (or,
    from ``log``, llama-server's timing lines) over the level, and the CPU time of the
    server's threads (process ``pid``) and of this process.

    The requests' prompts are numbered from ``first`` (by default ``c`` x 10,000): no level
    sends a prompt an earlier level (or the warm-up, from 0) sent, which a server caching
    whole prompts would answer without reading them.
    """
    level = Level(c)
    before = await asyncio.to_thread(step_counters, url)
    log_at = log.stat().st_size if log is not None else 0
    cpu_before = thread_cpu(pid) if pid is not None else {}
    client_before = time.process_time()
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=c + 4)
    ) as client:
        counter = itertools.count(c * 10_000 if first is None else first)

        async def user() -> None:
            for _ in range(args.rounds):
                outcome, ttft, tokens, _ = await stream_chat(
                    client, url, request_body(next(counter), args, extra)
                )
                level.requests += 1
                level.tokens += tokens
                if outcome == "refused":
                    level.refused += 1
                elif outcome == "broken" or tokens < args.tokens:
                    level.broken += 1
                if ttft is not None:
                    level.ttft.append(ttft)

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(c)))
        level.wall = time.perf_counter() - start
    if pid is not None and cpu_before:  # (no /proc: no CPU figures)
        level.cpu = cpu_split(cpu_before, thread_cpu(pid), decode_threads(args))
        level.cpu["client"] = time.process_time() - client_before
    after = await asyncio.to_thread(step_counters, url)
    level.steps = {k: v - before.get(k, 0.0) for k, v in after.items()}
    if log is not None:
        with log.open("rb") as f:
            f.seek(log_at)
            level.timings = server_timings(f.read().decode(errors="replace"))
    return level


async def measure_multi_turn(
    url: str, args: argparse.Namespace, extra: dict[str, Any]
) -> tuple[list[float], list[float]]:
    """Median TTFT of the first and the last turn over interleaved conversations."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(args.conversations)]
    played = await conversation_turns(url, histories, range(args.turns), args, extra)
    return played[0], played[-1]


@dataclass
class Restart:
    """Time to first token around a restart: turn 1, the last turn before, the turn after."""

    first: list[float] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    disk_bytes: int = 0  # saved KV caches on disk after the restart's shutdown


async def conversation_turns(
    url: str,
    histories: list[list[dict[str, str]]],
    turns: range,
    args: argparse.Namespace,
    extra: dict[str, Any],
) -> list[list[float]]:
    """Play ``turns`` of every conversation, round-robin; each turn's TTFTs (of the requests
    that gave text)."""
    out: list[list[float]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        for turn in turns:
            ttfts = []
            for conv, history in enumerate(histories):
                history.append(
                    {
                        "role": "user",
                        "content": f"Conversation {conv}, turn {turn}: "
                        f"go on with the story of {TOPICS[conv % len(TOPICS)]}.",
                    }
                )
                body = {
                    "model": args.model_id,
                    "messages": history,
                    "max_tokens": args.reply_tokens,
                    **GREEDY,
                    "stream": True,
                    **extra,
                }
                _, ttft, _, text = await stream_chat(client, url, body)
                history.append({"role": "assistant", "content": text})
                if ttft is not None:
                    ttfts.append(ttft)
            out.append(ttfts)
    return out


def measure_restart(
    name: str,
    cmd: list[str],
    port: int,
    extra: dict[str, Any],
    args: argparse.Namespace,
    log_dir: Path,
    state_dir: Path | None,
    cwd: Path = ROOT,
) -> Restart:
    """``args.turns`` turns of ``args.conversations`` conversations, a restart (SIGTERM, the
    same command and directories), and one more turn of each."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(args.conversations)]
    label = re.sub(r"\W+", "-", name)
    with server(label, cmd, port, log_dir, cwd) as (url, _):
        played = asyncio.run(conversation_turns(url, histories, range(args.turns), args, extra))
    result = Restart(first=played[0], before=played[-1])
    if state_dir is not None and state_dir.exists():
        result.disk_bytes = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    with server(label + "-restarted", cmd, port, log_dir, cwd) as (url, _):
        after = asyncio.run(
            conversation_turns(url, histories, range(args.turns, args.turns + 1), args, extra)
        )
    result.after = after[0]
    return result


def worker_alone(args: argparse.Namespace) -> list[Level]:
    """llamastream's engine with nothing else in its process: a `Worker` of ``--slots`` slots
    fed directly (no HTTP, no event loop, no other thread), ``c`` requests started in one step
    per round. What the server's steps cost without the server around them.
    """
    import dataclasses
    import threading

    from llamastream.engine.gpu import Offload
    from llamastream.engine.sampling import SamplingParams
    from llamastream.engine.worker import Event, Finished, Job, TextChunk, Worker, load_llama

    vocab = load_llama(str(args.model), vocab_only=True)
    template = ChatTemplate.from_metadata(vocab.metadata, bos="", eos="")
    worker = Worker(
        0,
        str(args.model),
        n_slots=args.slots,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        offload=Offload(n_gpu_layers=args.n_gpu_layers),
    )
    worker.start().result(300)
    params = SamplingParams(
        temperature=0.0, repeat_penalty=1.0, max_new_tokens=args.tokens, ignore_eos=True
    )
    numbers = itertools.count(10**6)  # prompts of their own, as the servers' levels have
    levels = []

    def listener(level: Level, firsts: list[float], i: int) -> Callable[[Event], None]:
        """Job ``i``'s listener: when its first text came, and its tokens."""

        def on_event(event: Event) -> None:
            if isinstance(event, TextChunk) and event.text and not firsts[i]:
                firsts[i] = time.perf_counter()
            if isinstance(event, Finished):
                level.tokens += event.completion_tokens

        return on_event

    try:
        for c in args.concurrency:
            level = Level(c)
            before = dataclasses.replace(worker.times)
            start = time.perf_counter()
            for _ in range(args.rounds):
                firsts = [0.0] * c
                jobs = []
                for i in range(c):
                    body = request_body(next(numbers), args, {})
                    prompt = vocab.tokenize(
                        template.render(body["messages"]).encode(), special=True
                    )
                    jobs.append(Job(prompt, params, listener(level, firsts, i)))
                gate = threading.Event()
                worker.call(gate.wait)  # every job of the round starts in one step
                for seq, job in enumerate(jobs):
                    worker.submit(job, seq)
                began = time.perf_counter()
                gate.set()
                for job in jobs:
                    job.done.wait(args.timeout)
                level.ttft += [t - began for t in firsts if t]
                level.requests += c
            level.wall = time.perf_counter() - start
            after = worker.times
            level.steps = {
                f.name: float(getattr(after, f.name) - getattr(before, f.name))
                for f in dataclasses.fields(after)
            }
            levels.append(level)
    finally:
        worker.stop()
        vocab.close()
    return levels


def raw_floor(args: argparse.Namespace) -> Level:
    """In-process llama-cpp-python, token by token, one request at a time: the floor.

    ``Llama.generate`` with nothing between tokens but an incremental UTF-8 decode, so it is
    what llama-cpp-python can do at best for one stream (no HTTP, no sampling in Python).
    """
    import codecs

    import llama_cpp

    llama = llama_cpp.Llama(
        str(args.model),
        n_ctx=args.n_ctx,
        n_threads=args.threads or CpuSet.current().physical,
        n_gpu_layers=args.n_gpu_layers,
        verbose=False,
    )
    template = ChatTemplate.from_metadata(llama.metadata, bos="", eos="")
    level = Level(1)
    for i in range(args.rounds + 1):
        body = request_body(i, args, {})
        # The same prompt the servers build: the model's own chat template.
        prompt = llama.tokenize(template.render(body["messages"]).encode(), special=True)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        start = time.perf_counter()
        ttft = None
        tokens = 0
        llama.reset()
        for token in llama.generate(prompt, temp=0, top_k=1, repeat_penalty=1.0):
            if decoder.decode(llama.detokenize([token])) and ttft is None:
                ttft = time.perf_counter() - start
            tokens += 1
            if tokens == args.tokens:
                break
        if i == 0:
            continue  # warm-up
        level.wall += time.perf_counter() - start
        level.tokens += tokens
        level.requests += 1
        if ttft is not None:
            level.ttft.append(ttft)
    llama.close()
    return level


WORKER = "llamastream's worker alone (in-process)"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def decode_threads(args: argparse.Namespace) -> int:
    """How many threads every server decodes with on this CPU (the `threads_note`)."""
    return int(args.threads or CpuSet.current().physical)


def threads_note(args: argparse.Namespace) -> str:
    if args.threads:
        return f"{args.threads} for every server (`--threads`)"
    return (
        "llamastream and llama-server with their defaults; llama-cpp-python (server and raw "
        f"floor) {CpuSet.current().physical}, the physical cores usable here"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client and level")
    parser.add_argument("--slots", type=int, default=16, help="parallel slots of every server")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context per slot")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of every server; unset: llamastream and llama-server choose their "
        "own (what a user gets), llama-cpp-python (server and raw floor) gets the physical "
        "cores this process may use (its own default is half the logical CPUs)",
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--reply-tokens", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--only",
        nargs="+",
        help="measure only these: raw llamastream llama-cpp-python llama-server worker (the "
        "worker alone, in-process: the server's steps without HTTP)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="instead of the concurrency levels: --conversations x --turns on --slots, a "
        "restart of each server (SIGTERM, same directories), one more turn each; TTFT at turn "
        "1, the last turn before and the turn after the restart",
    )
    parser.add_argument(
        "--task",
        choices=["chat", "echo"],
        default="chat",
        help="chat: write a story; echo: rewrite a given text (input-grounded: what prompt "
        "lookup drafts from)",
    )
    parser.add_argument(
        "--llama-server-variant",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="also measure llama-server started with these extra arguments, e.g. "
        "'ngram=--spec-type ngram-simple' (repeatable)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every server this many times, in turn (a shared machine's noise: the "
        "report gives median tokens/s and each run's ratio)",
    )
    parser.add_argument("--name", default="cpu", help="output file name in docs/benchmarks/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument(
        "--without-saved-caches",
        action="store_true",
        help="also measure llamastream with kv_state_bytes=0 (caches of conversations that "
        "lost their slot are not saved)",
    )
    parser.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also measure llamastream from another checkout of it (say a git worktree of an "
        "earlier commit: its code, this environment's packages), to compare two versions in "
        "one run (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="also measure llamastream started with these extra arguments, e.g. "
        "'no flash attention=--flash-attn off' (repeatable)",
    )
    args = parser.parse_args()
    args.model_id = args.model.stem
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "llamastream-bench"
    log_dir.mkdir(exist_ok=True)
    eog = eog_tokens(args.model)
    wanted = set(args.only or ["raw", "llamastream", "llama-cpp-python", "llama-server", "worker"])
    py = sys.executable
    targets: list[tuple[str, list[str], dict[str, Any], int]] = []
    checkouts: dict[str, Path] = {}  # targets run from another checkout of llamastream
    port = free_port()
    if "llamastream" in wanted:
        cmd = [
            py,
            "-m",
            "llamastream",
            "serve",
            "--model",
            str(args.model),
            "--port",
            str(port),
            "--slots",
            str(args.slots),
            "--queue",
            "256",
            "--n-ctx",
            str(args.n_ctx),
            "--max-new-tokens",
            str(max(args.tokens, args.reply_tokens)),
            *(["--n-threads", str(args.threads)] if args.threads else []),
            "--n-gpu-layers",
            str(args.n_gpu_layers),
            "--session-dir",
            tempfile.mkdtemp(prefix="sessions-", dir=log_dir),
            "--log-level",
            "warning",
        ]
        targets.append(("llamastream", cmd, {"ignore_eos": True}, port))
        for label, checkout in (c.partition("=")[::2] for c in args.checkout):
            port = free_port()
            other = [*cmd, "--port", str(port)]
            other[other.index("--session-dir") + 1] = tempfile.mkdtemp(dir=log_dir)
            # `python -m` imports the package from its working directory first.
            checkouts[f"llamastream, {label}"] = Path(checkout).resolve()
            targets.append((f"llamastream, {label}", other, {"ignore_eos": True}, port))
        variants = [v.partition("=")[::2] for v in args.variant]
        if args.without_saved_caches:
            variants.insert(0, ("no saved caches", "--kv-state-bytes 0"))
        for label, extra_args in variants:
            port = free_port()
            variant = [*cmd, *shlex.split(extra_args), "--port", str(port)]
            variant[variant.index("--session-dir") + 1] = tempfile.mkdtemp(dir=log_dir)
            targets.append((f"llamastream, {label}", variant, {"ignore_eos": True}, port))
    port = free_port()
    if "llama-cpp-python" in wanted:
        cmd = [
            py,
            "-m",
            "llama_cpp.server",
            "--model",
            str(args.model),
            "--port",
            str(port),
            "--n_ctx",
            str(args.n_ctx),
            "--n_threads",
            str(args.threads or CpuSet.current().physical),
            "--model_alias",
            args.model_id,
            "--n_gpu_layers",
            str(args.n_gpu_layers),
        ]
        targets.append(
            ("llama-cpp-python server", cmd, {"logit_bias": {str(t): -100 for t in eog}}, port)
        )
    port = free_port()
    if "llama-server" in wanted and args.llama_server:
        cmd = [
            str(args.llama_server),
            "-m",
            str(args.model),
            "--port",
            str(port),
            "-np",
            str(args.slots),
            "-c",
            str(args.n_ctx * args.slots),
            *(["-t", str(args.threads)] if args.threads else []),
            "--alias",
            args.model_id,
            "-ngl",
            str(args.n_gpu_layers),
        ]
        targets.append((f"llama-server -np {args.slots}", cmd, {"ignore_eos": True}, port))
        for label, extra_args in (v.partition("=")[::2] for v in args.llama_server_variant):
            port = free_port()
            variant = [*cmd, *shlex.split(extra_args)]
            variant[variant.index("--port") + 1] = str(port)
            targets.append(
                (f"llama-server -np {args.slots}, {label}", variant, {"ignore_eos": True}, port)
            )

    if args.restart:
        restarts = {}
        for name, cmd, extra, port in targets:
            print(f"{name}: restart …", flush=True)
            state_dir = None
            if "--session-dir" in cmd:
                state_dir = Path(cmd[cmd.index("--session-dir") + 1]) / "kv-states"
            restarts[name] = measure_restart(
                name, cmd, port, extra, args, log_dir, state_dir, checkouts.get(name, ROOT)
            )
        write_restart_report(args, restarts)
        return
    runs: dict[str, list[list[Level]]] = {}
    multi: dict[str, tuple[list[float], list[float]]] = {}
    if "raw" in wanted:
        print("raw in-process llama-cpp-python …", flush=True)
        runs["raw llama-cpp-python (in-process)"] = [[raw_floor(args)]]
    for repeat in range(args.repeat):
        if "worker" in wanted:
            print(f"{WORKER} (run {repeat + 1} of {args.repeat}) …", flush=True)
            runs.setdefault(WORKER, []).append(worker_alone(args))
        # Every server once per repeat, in turn (the order reversed every other repeat), so
        # that a slow spell of a shared machine falls on all of them.
        for name, cmd, extra, port in targets if repeat % 2 == 0 else targets[::-1]:
            print(f"{name} (run {repeat + 1} of {args.repeat}) …", flush=True)
            label = re.sub(r"\W+", "-", name)
            # llama-server's timing lines are read from its log.
            log = log_dir / f"{label}.log" if cmd[0] == str(args.llama_server) else None
            with server(label, cmd, port, log_dir, checkouts.get(name, ROOT)) as (url, pid):
                warm_up = argparse.Namespace(**{**vars(args), "rounds": 1})
                asyncio.run(measure_level(url, 1, warm_up, extra, first=0))
                levels = [
                    asyncio.run(measure_level(url, c, args, extra, log, pid=pid))
                    for c in args.concurrency
                ]
                runs.setdefault(name, []).append(levels)
                for level in levels:
                    print(
                        f"  c={level.concurrency}: {level.rate:.0f} tok/s, "
                        f"broken {level.broken}, refused {level.refused}",
                        flush=True,
                    )
                if repeat == 0 and args.turns > 1 and args.conversations > 0:
                    multi[name] = asyncio.run(measure_multi_turn(url, args, extra))
    write_report(args, runs, multi)


def report_head(args: argparse.Namespace) -> list[str]:
    """A report's title, command, machine and date lines."""
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    return [
        f"# Benchmark: {args.name}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def ratio(runs: dict[str, list[list[Level]]], a: str, b: str, c: int, c_b: int = 0) -> str:
    """``a``'s rate at concurrency ``c`` over ``b``'s at ``c_b`` (default ``c``): the median
    of the repeats' ratios (each repeat measured the two close in time), and their range."""
    c_b = c_b or c
    ratios = []
    # The raw floor is measured once: every run of ``a`` is set against it.
    others = runs[b] if len(runs[b]) == len(runs[a]) else runs[b][:1] * len(runs[a])
    for mine, theirs in zip(runs[a], others, strict=True):
        x = next((lv.rate for lv in mine if lv.concurrency == c), 0.0)
        y = next((lv.rate for lv in theirs if lv.concurrency == c_b), 0.0)
        if x and y:
            ratios.append(x / y)
    if not ratios:
        return ""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} (runs: {', '.join(f'{r:.2f}' for r in ratios)})"


def write_report(
    args: argparse.Namespace,
    runs: dict[str, list[list[Level]]],
    multi: dict[str, tuple[list[float], list[float]]],
) -> None:
    results = {
        name: [merge([levels[i] for levels in repeats]) for i in range(len(repeats[0]))]
        for name, repeats in runs.items()
    }
    repeats = (
        f" Each server measured {args.repeat} times, in turn: tokens/s are the medians, TTFTs "
        "and counts pooled over the runs."
        if args.repeat > 1
        else ""
    )
    lines = [
        *report_head(args),
        f"- Model: `{args.model.name}`; task `{args.task}`; {args.tokens} generated tokens per "
        "request (end of sequence suppressed), greedy, no repetition penalty; "
        f"{args.slots} slots of {args.n_ctx} tokens; {args.rounds} requests per client." + repeats,
        f"- Threads: {threads_note(args)}.",
        "",
        "| server | concurrency | aggregate tokens/s | TTFT p50 (ms) | TTFT p95 (ms) "
        "| broken | refused | requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, levels in results.items():
        for lv in levels:
            lines.append(
                f"| {name} | {lv.concurrency} | {lv.rate:.0f} | {pct(lv.ttft, 0.5) * 1000:.0f} | "
                f"{pct(lv.ttft, 0.95) * 1000:.0f} | {lv.broken} | {lv.refused} | {lv.requests} |"
            )
    ours = results.get("llamastream")
    raw = "raw llama-cpp-python (in-process)"
    if ours:
        lines += ["", "## Ratios", ""]
        by_c = {lv.concurrency: lv for lv in ours}
        if raw in runs and 1 in by_c:
            lines.append(
                f"- llamastream at concurrency 1 / raw in-process: "
                f"{ratio(runs, 'llamastream', raw, 1)}"
            )
        top = max(by_c)
        if 1 in by_c and top != 1:
            lines.append(
                f"- llamastream at concurrency {top} / llamastream at 1: "
                f"{ratio(runs, 'llamastream', 'llamastream', top, 1)}"
            )
        for name, levels in results.items():
            if name in ("llamastream", raw):
                continue
            for lv in levels:
                if lv.concurrency in by_c and lv.rate:
                    lines.append(
                        f"- llamastream / {name} at concurrency {lv.concurrency}: "
                        f"{ratio(runs, 'llamastream', name, lv.concurrency)}"
                    )
    lines += step_table(results)
    lines += cpu_table(results, decode_threads(args))
    if multi:
        lines += [
            "",
            f"## Multi-turn: {args.conversations} conversations x {args.turns} turns, "
            f"{args.reply_tokens}-token replies, round-robin",
            "",
            "| server | TTFT turn 1 median (ms) | TTFT last turn median (ms) | ratio |",
            "|---|---:|---:|---:|",
        ]
        for name, (first, last) in multi.items():
            a, b = (
                statistics.median(first) if first else float("nan"),
                statistics.median(last) if last else float("nan"),
            )
            lines.append(f"| {name} | {a * 1000:.0f} | {b * 1000:.0f} | {b / a:.2f} |")
    report = args.out / f"{args.name}.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, levels in results.items():
        xs = [lv.concurrency for lv in levels]
        ys = [lv.rate for lv in levels]
        if len(xs) == 1:
            ax.axhline(ys[0], linestyle="--", color="grey", label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{args.model.name}, {args.tokens} tokens per request")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png", dpi=110)


PHASES = ("build", "draft", "decode", "sample", "emit")


def step_table(results: dict[str, list[Level]]) -> list[str]:
    """Where a step's time goes: llamastream's own step timers, and llama-server's timing
    log beside them."""
    rows = []
    for name, levels in results.items():
        for lv in levels:
            st, tm = lv.steps, lv.timings
            if st.get("steps"):
                n = st["steps"]
                busy = sum(st.get(p, 0.0) for p in PHASES)
                events = st.get("events")  # (none without a server)
                wait = f"{st['event_wait'] / events * 1000:.2f}" if events else "-"
                per = " | ".join(f"{st.get(p, 0.0) / n * 1000:.1f}" for p in PHASES)
                rows.append(
                    f"| {name} | {lv.concurrency} | {busy / n * 1000:.1f} | {per} | "
                    f"{st['slots'] / n:.1f} | {st['tokens'] / n:.1f} | {st['runs'] / n:.2f} | "
                    f"{100 * busy / lv.wall:.0f}% | {wait} | - | - |"
                )
            elif tm.get("eval_tokens"):
                eval_ms = tm["eval_ms"] / tm["eval_tokens"]
                prompt_ms = tm["prompt_ms"] / max(tm["prompt_tokens"], 1)
                rows.append(
                    f"| {name} | {lv.concurrency} | {' | '.join(['-'] * 11)} | {eval_ms:.1f} | "
                    f"{prompt_ms:.2f} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Decode steps",
        "",
        "llamastream's own step timers (`llamastream_decode_step_*` in `/metrics`, over the "
        "level): milliseconds per step in all and by phase (build: starting jobs and filling "
        "the batch; draft: the draft model; decode: `llama_decode`, taking the GIL back "
        "included; sample: the sampler chains, penalties, drafts verified; emit: "
        "detokenizing, stop strings, handing text to the event loop), active slots and batch "
        "rows per step, runs of consecutive slots per step (llama.cpp computes each run "
        "apart, a pass over the weights each), the share of the level's wall time spent "
        "in steps, and the mean wait of a worker's event (text, the end) before its stream "
        "took it on the event loop (`llamastream_stream_event_wait_seconds`). llama-server "
        "has no step timer: its timing log gives each request's generation milliseconds per "
        "token (one token per step per slot: its step time while the request generates) and "
        "prompt milliseconds per token.",
        "",
        "| server | concurrency | ms per step | build | draft | decode | sample | emit "
        "| slots per step | rows per step | runs per step | in steps | event wait (ms) "
        "| llama-server eval ms per token | llama-server prompt ms per token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def cpu_table(results: dict[str, list[Level]], decoding: int) -> list[str]:
    """CPU milliseconds per generated token: the servers' decoding threads, the rest of each
    server, and the benchmark client."""
    rows = [
        f"| {name} | {lv.concurrency} | "
        + " | ".join(f"{lv.cpu[k] / lv.tokens * 1000:.2f}" for k in ("decode", "rest", "client"))
        + " |"
        for name, levels in results.items()
        for lv in levels
        if lv.cpu and lv.tokens
    ]
    if not rows:
        return []
    return [
        "",
        "## CPU per generated token",
        "",
        "CPU time over the level (`/proc/<pid>/task/*/stat`) per generated token, in "
        f"milliseconds: the server's {decoding} busiest threads (the threads decoding on this "
        "CPU), the rest of the server (llamastream: its event loop and thread pool; "
        "llama-server: its HTTP threads), and this benchmark's own process, the client "
        "(parsing the streams). On a machine whose cores all decode, every millisecond "
        "beside decoding is taken from the decode threads.",
        "",
        f"| server | concurrency | {decoding} busiest threads (decoding) | rest of the server "
        "| benchmark client |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


def write_restart_report(args: argparse.Namespace, restarts: dict[str, Restart]) -> None:
    lines = [
        *report_head(args),
        f"- Model: `{args.model.name}`; {args.conversations} conversations x {args.turns} turns "
        f"on {args.slots} slots of {args.n_ctx} tokens, round-robin, one request at a time, "
        f"each turn resending the whole history; {args.reply_tokens}-token replies (end of "
        "sequence suppressed), greedy. Then each server is stopped with SIGTERM and started "
        "again with the same command and directories, and every conversation takes one more "
        "turn.",
        f"- Threads: {threads_note(args)}.",
        "",
        "| server | TTFT turn 1 (ms) | TTFT turn "
        f"{args.turns} (ms) | TTFT turn {args.turns + 1}, after the restart (ms) | after / "
        "before | saved caches on disk per conversation (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in restarts.items():
        first, before, after = (statistics.median(v) for v in (r.first, r.before, r.after))
        disk = f"{r.disk_bytes / args.conversations / 2**20:.1f}" if r.disk_bytes else "-"
        lines.append(
            f"| {name} | {first * 1000:.0f} | {before * 1000:.0f} | {after * 1000:.0f} | "
            f"{after / before:.2f} | {disk} |"
        )
    lines += ["", "Medians over the conversations."]
    report = args.out / f"{args.name}.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
