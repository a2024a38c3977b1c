"""Fuzz the HTTP API with Schemathesis against a real `llamastream serve`, from its /openapi.json.

Starts the server itself on a free 127.0.0.1 port (the tiny random-weight test model unless
``--model`` is given, sessions in a temp dir) and runs ``schemathesis run`` with every check
(no 5xx, documented statuses, content types, headers and response schemas, schema-valid data
accepted and invalid data refused) over the phases asked for. Reports the test cases and
statuses per operation, the 5xx, and the failing checks; then whether the server is idle.

    python scripts/fuzz_api.py                              # 100 examples per operation
    python scripts/fuzz_api.py --max-examples 500 --output docs/fuzz.md

Two allowances, both stated in the report:

- ``model`` in /v1 bodies is set to the served model's id (a Schemathesis hook) whenever it
  is a string, so that schema-valid requests reach generation instead of all ending in 404.
- 400 counts as an acceptable answer to schema-valid data on the routes that generate or set
  generation parameters: what they refuse there depends on the server's settings and state,
  which a static schema cannot say (``max_new_tokens`` above the server's limit, an input
  longer than the context in tokens, regenerating an empty conversation, a token id beyond
  the model's vocabulary, an embedding input longer than its context, a tool choice naming
  no tool, a tool result answering no call, a chat template refusing the turns). The report lists
  the error codes of those 400s so they can be checked.

Exits non-zero when Schemathesis found a failure, any response was a 5xx, the server died,
or a slot is still busy afterwards. Bounded by ``--max-examples`` and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadtest import header, served, wait_idle

GENERATING = [
    "/chat_stream",
    "/set_generation_params",
    "/v1/chat/completions",
    "/v1/completions",
    "/detokenize",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/show",
]

CONFIG = """\
[[operations]]
include-path-regex = "^({paths})$"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", 400, 401, 403, 404, 409, 429, "5xx",
]
"""

HOOKS = """\
import schemathesis

MODEL = {model!r}


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return {{**body, "model": MODEL}}
    return body
"""


def schemathesis_cli() -> str:
    beside = Path(sys.executable).with_name("schemathesis")
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if found is None:
        raise SystemExit("schemathesis is not installed (pip install -e '.[test]')")
    return found


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tally(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per operation: test cases, statuses, and the error codes of the 400s."""
    ops: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"cases": 0, "statuses": Counter(), "codes_400": Counter()}
    )
    for event in events:
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished.get("recorder", {})
        label = recorder.get("label", "?")
        op = ops[label]
        for interaction in recorder.get("interactions", {}).values():
            response = interaction.get("response")
            op["cases"] += 1
            if response is None:
                op["statuses"]["no response"] += 1
                continue
            status = int(response["status_code"])
            op["statuses"][status] += 1
            if status == 400:
                op["codes_400"][_error_code(response)] += 1
    return ops


def _error_code(response: dict[str, Any]) -> str:
    content = response.get("content") or {}
    raw = content.get("$base64")
    try:
        body = json.loads(base64.b64decode(raw) if raw else content.get("string", ""))
    except (ValueError, TypeError):
        return "?"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code"))
    return str(error)


def report(
    ops: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    idle: dict[str, Any],
    alive: bool,
    exit_code: int,
) -> tuple[str, bool]:
    five_xx = sum(
        n
        for op in ops.values()
        for s, n in op["statuses"].items()
        if isinstance(s, int) and s >= 500
    )
    failures = summary.get("failures", [])
    idle_now = idle.get("processing") == 0 and idle.get("waiting") == 0
    passed = exit_code == 0 and not failures and five_xx == 0 and alive and idle_now
    out = [
        "| operation | cases | statuses | error codes of the 400s |",
        "|---|---:|---|---|",
    ]
    for label in sorted(ops, key=lambda s: s.split(" ", 1)[::-1]):
        op = ops[label]
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(op["statuses"].items(), key=str))
        codes = ", ".join(f"{c} {n}" for c, n in op["codes_400"].most_common())
        out.append(f"| `{label}` | {op['cases']} | {statuses} | {codes} |")
    total = sum(op["cases"] for op in ops.values())
    out.append(f"| **all** | **{total}** | | |")
    cases = summary.get("test_cases", {})
    phases = ", ".join(
        f"{name} {info.get('status')}" for name, info in summary.get("phases", {}).items()
    )
    rows = [
        ("operations tested", summary.get("operations", {}).get("tested", "?")),
        ("test cases (Schemathesis' count)", cases.get("generated", "?")),
        ("phases", phases),
        ("**5xx responses**", f"**{five_xx}**"),
        ("**failing checks**", f"**{len(failures)}**"),
        ("errors", len(summary.get("errors", []))),
        ("running time", f"{summary.get('running_time', 0):.1f} s"),
        ("seed", summary.get("seed", "?")),
        (
            "slots busy / queued afterwards",
            f"{idle.get('processing', '?')} / {idle.get('waiting', '?')}",
        ),
        ("server still running", "yes" if alive else "**no**"),
        ("**result**", f"**{'pass' if passed else 'FAIL'}**"),
    ]
    out += ["", "| | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    if failures:
        out += ["", "Failing checks:", ""]
        for failure in failures:
            where = ", ".join(failure.get("operations", []))
            out.append(
                f"- {failure.get('code')} {failure.get('title')} x{failure.get('count')}: {where}"
            )
    return "\n".join(out) + "\n", passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the tiny test model)")
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation")
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    parser.add_argument("--checks", default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop Schemathesis here")
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--schemathesis-log", type=Path, help="keep Schemathesis' output here")
    args = parser.parse_args(argv)

    extra = ["--n-ctx", "512", "--max-new-tokens", "32", "--n-threads", "1"]
    extra += ["--embeddings-from-chat-model", "--embedding-n-ctx", "64"]  # /v1/embeddings too
    extra += ["--shutdown-grace-s", "5", "--max-input-chars", "4000"]
    with tempfile.TemporaryDirectory(prefix="llamastream-fuzz-") as tmp:
        work = Path(tmp)
        with served(
            work, model=args.model, slots=args.slots, queue=args.queue, extra=extra
        ) as server:
            model_id = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            config = work / "schemathesis.toml"
            config.write_text(CONFIG.format(paths="|".join(GENERATING)))
            hooks = work / "hooks.py"
            hooks.write_text(HOOKS.format(model=model_id))
            reports = work / "reports"
            command = [
                schemathesis_cli(),
                "--config-file",
                str(config),
                "run",
                server.url + "/openapi.json",
                "--checks",
                args.checks,
                "--phases",
                args.phases,
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--workers",
                str(args.workers),
                "--continue-on-failure",
                "--output-sanitize",
                "false",
                "--request-timeout",
                "30",
                "--report",
                "json,ndjson",
                "--report-dir",
                str(reports),
            ]
            print(f"server {server.url} up; {' '.join(command[3:6])} ...", file=sys.stderr)
            env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "NO_COLOR": "1"}
            try:
                run = subprocess.run(
                    command,
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.max_seconds,
                )
                exit_code, output = run.returncode, run.stdout + run.stderr
            except subprocess.TimeoutExpired as exc:
                exit_code = 124
                partial = exc.stdout or b""
                output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
                output += f"\nstopped after --max-seconds {args.max_seconds:g}\n"
            if args.schemathesis_log:
                args.schemathesis_log.write_text(output)
            alive = server.proc.poll() is None
            idle = wait_idle(server.url, 10)[0] if alive else {}
            json_reports = sorted(reports.glob("json-*.json"))
            ndjson = sorted(reports.glob("ndjson-*.ndjson"))
            summary = json.loads(json_reports[-1].read_text()) if json_reports else {}
            ops = tally(read_events(ndjson[-1])) if ndjson else {}
    if not summary:
        print(output[-6000:], file=sys.stderr)
        summary = {"failures": [{"code": "-", "title": "no report", "count": 1}]}
    table, passed = report(ops, summary, idle, alive, exit_code)
    settings = (
        f"Schemathesis {summary.get('schemathesis_version', '?')}: checks {args.checks}, "
        f"phases {args.phases}, at most {args.max_examples} examples per operation; "
        f"server with {args.slots} slots, queue {args.queue}, model "
        f"{args.model.name if args.model else 'tiny random-weight test model'}.\n\n"
    )
    if not passed:
        print(output[-12000:], file=sys.stderr)
    print(settings + table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(header("llamastream API fuzzing") + settings + table)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
