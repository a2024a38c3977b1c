"""The load test and the API fuzzer run end to end on the tiny model, with small budgets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(150)
def test_loadtest_reports_no_5xx_and_idle_slots(tmp_path: Path) -> None:
    output = tmp_path / "loadtest.md"
    done = run_script(
        "loadtest.py",
        *("--requests", "40", "--concurrency", "8", "--slots", "2", "--queue", "2"),
        *("--max-seconds", "60", "--output", str(output)),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| requests sent | 40 of 40" in done.stdout
    assert "| **5xx** | **0** |" in done.stdout
    assert "| **slots busy / queued after the run** | **0 / 0**" in done.stdout
    assert "| **result** | **pass** |" in done.stdout
    written = output.read_text()
    assert written.startswith("# llamastream load test\n\n    python ")
    assert "cores" in written
    assert "| **5xx** | **0** |" in written


@pytest.mark.timeout(150)
def test_fuzz_api_finds_no_5xx_and_documented_answers(tmp_path: Path) -> None:
    output = tmp_path / "fuzz.md"
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance,positive_data_acceptance"
    )
    done = run_script(
        "fuzz_api.py",
        *("--max-examples", "5", "--checks", checks, "--max-seconds", "90"),
        *("--output", str(output)),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| **5xx responses** | **0** |" in done.stdout
    assert "| **failing checks** | **0** |" in done.stdout
    assert "| `POST /chat_stream` |" in done.stdout
    assert "| slots busy / queued afterwards | 0 / 0 |" in done.stdout
    assert output.read_text().startswith("# llamastream API fuzzing\n\n    python ")
