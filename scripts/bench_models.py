"""Several models on one server: time to first token of a cold model (load + prompt) and a warm
one, and the server's memory over load/unload cycles.

One `llamastream serve` process is started here with a small default model (the tiny test
model, written here) and the models measured (``--model NAME=PATH``, default: SmolLM2 and the
tiny model). For each: ``--repeats`` cold requests (the model unloaded before each through
`/admin/models/unload`, so the time includes its load) and as many warm ones, each a streamed
chat of ``--tokens`` tokens on a prompt of its own; then ``--cycles`` load / request / unload
cycles with the server's resident memory (VmRSS) read after each unload.

    python scripts/bench_models.py --output docs/benchmarks/models-cpu.md

Prints the tables and writes them (the command and the machine at the top) to ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import eog_tokens, free_port, machine
from make_tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer bench-admin"}
TOPICS = ["a lighthouse", "a robot", "the sea", "a mountain", "a library", "a city", "a garden"]


@contextlib.contextmanager
def serve(args: list[str], port: int, log: Path) -> Iterator[tuple[str, int]]:
    """`llamastream serve` with ``args``: its URL and process id, until the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llamastream", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mib(pid: int) -> float:
    """The process's resident memory (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def ttft(client: httpx.Client, model: str, i: int, tokens: int, bias: dict[str, int]) -> float:
    """One streamed chat: seconds from sending it to its first text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 7]}."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": bias,
    }
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {response.read()!r}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{model}: no text")
    return first


def admin(client: httpx.Client, action: str, model: str) -> dict[str, Any]:
    response = client.post(f"/admin/models/{action}", json={"model": model}, headers=ADMIN)
    response.raise_for_status()
    return {m["id"]: m for m in response.json()["models"]}  # type: ignore[no-any-return]


def measure(
    client: httpx.Client, pid: int, name: str, path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    bias = {str(t): -100 for t in eog_tokens(path)}
    cold, warm = [], []
    for i in range(args.repeats):
        admin(client, "unload", name)
        cold.append(ttft(client, name, i, args.tokens, bias))
        warm.append(ttft(client, name, i + args.repeats, args.tokens, bias))
    admin(client, "unload", name)
    baseline = rss_mib(pid)
    entry = admin(client, "load", name)[name]
    loaded = rss_mib(pid)
    after: list[float] = []
    for i in range(args.cycles):
        if i:
            admin(client, "load", name)
        ttft(client, name, i, 4, bias)
        admin(client, "unload", name)
        after.append(rss_mib(pid))
    return {
        "name": name,
        "file_mib": path.stat().st_size / 2**20,
        "planned_mib": entry["memory_mib"]["host"] + entry["memory_mib"]["gpu"],
        "load_s": entry["load_seconds"],
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "baseline": baseline,
        "loaded": loaded,
        "after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to measure (default: smollm2 and tiny)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="cold and warm requests each")
    parser.add_argument("--cycles", type=int, default=20, help="load/unload cycles")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per measured request")
    parser.add_argument("--output", type=Path, help="write the report here too")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-models-"))
    anchor = write_tiny_gguf(scratch / "anchor.gguf", seed=11)
    models = dict(m.split("=", 1) for m in args.model) or {
        "smollm2": str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "tiny": str(write_tiny_gguf(scratch / "tiny.gguf")),
    }
    paths = {name: Path(p) for name, p in models.items()}
    config = [{"name": name, "model_path": str(p)} for name, p in paths.items()]
    serve_args = [
        *("--model", str(anchor), "--models", json.dumps(config)),
        *("--admin-keys", "bench-admin", "--session-dir", str(scratch / "sessions")),
        *("--log-level", "warning"),
    ]
    port = free_port()
    results = []
    with (
        serve(serve_args, port, scratch / "server.log") as (url, pid),
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        for name, path in paths.items():
            results.append(measure(client, pid, name, path, args))
    report = write_report(args, results)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")


def write_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_models.py", *sys.argv[1:]])
    lines = [
        "# Several models: cold and warm time to first token, memory over load/unload cycles",
        "",
        f"    {command}",
        "",
        f"Machine: {machine()}. One `llamastream serve` process with its defaults (n_gpu_layers "
        "auto: CPU here), a tiny default model, and the models below configured in `models`; "
        f"{args.tokens}-token streamed chats, greedy, end of sequence suppressed; median of "
        f"{args.repeats}. Cold: the model unloaded first (`/admin/models/unload`), so the time "
        "includes loading it; warm: loaded, a prompt not seen before.",
        "",
        "| model | file MiB | planned MiB | load s | TTFT cold s | TTFT warm s | cold / warm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['file_mib']:.1f} | {r['planned_mib']:.1f} | {r['load_s']:.3f} | "
            f"{r['cold']:.3f} | {r['warm']:.3f} | {r['cold'] / r['warm']:.1f}x |"
        )
    lines += [
        "",
        f"Resident memory of the server (VmRSS, MiB) around {args.cycles} load / request / unload "
        "cycles of each model:",
        "",
        "| model | before load | loaded | after 1st unload | after 10th | after last | "
        "last - before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        after = r["after"]
        tenth = after[min(9, len(after) - 1)]
        lines.append(
            f"| {r['name']} | {r['baseline']:.1f} | {r['loaded']:.1f} | {after[0]:.1f} | "
            f"{tenth:.1f} | {after[-1]:.1f} | {after[-1] - r['baseline']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
