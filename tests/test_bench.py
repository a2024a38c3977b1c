"""scripts/bench.py end to end with tiny numbers: it starts llamastream, measures, and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_bench_smoke(tiny_model: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(tiny_model)]
    cmd += ["--only", "raw", "llamastream", "worker", "--concurrency", "1", "2", "--tokens", "8"]
    cmd += ["--rounds", "1", "--slots", "2", "--n-ctx", "512", "--conversations", "2"]
    cmd += ["--turns", "2", "--reply-tokens", "4", "--timeout", "60"]
    cmd += ["--name", "smoke", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "smoke.md").read_text()
    assert "- Command: `python scripts/bench.py" in report
    rows = [line for line in report.splitlines() if line.startswith("| llamastream |")]
    # concurrency 1 and 2, their decode steps, their CPU per token, and the multi-turn row
    assert len(rows) == 7
    cells = rows[1].split("|")
    assert float(cells[3]) > 0  # aggregate tokens/s at concurrency 2
    assert cells[6].strip() == "0" and cells[7].strip() == "0"  # nothing broken or refused
    assert "llamastream at concurrency 1 / raw in-process" in report
    # The step breakdown, from the server's own timers: the phases add up to the step.
    steps = report.split("## Decode steps")[1]
    row = next(line for line in steps.splitlines() if line.startswith("| llamastream | 2 |"))
    cells = [c.strip() for c in row.split("|")[3:-1]]
    per_step, phases = float(cells[0]), [float(c) for c in cells[1:6]]
    assert per_step > 0 and phases[2] > 0  # time in llama_decode
    assert abs(sum(phases) - per_step) <= 0.3  # (six figures, each rounded to 0.1 ms)
    assert 1 <= float(cells[6]) <= 2  # active slots per step
    # CPU per generated token: the server's decoding threads, the rest of it, the client.
    cpu = report.split("## CPU per generated token")[1].split("\n## ")[0]
    cpu_rows = [line for line in cpu.splitlines() if line.startswith("| llamastream |")]
    assert [row.split("|")[2].strip() for row in cpu_rows] == ["1", "2"]
    for row in cpu_rows:
        decode, rest, client = (float(c) for c in row.split("|")[3:6])
        assert decode >= 0 and rest >= 0 and client > 0
    # The worker alone (in-process, no server): its own rate and steps.
    alone = [line for line in report.splitlines() if line.startswith("| llamastream's worker")]
    assert len(alone) == 4  # two levels, two step rows
    assert float(alone[1].split("|")[3]) > 0  # tokens/s at concurrency 2
    assert float(alone[3].split("|")[3]) > 0  # ms per step


def test_bench_restart_smoke(tiny_model: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(tiny_model)]
    cmd += ["--only", "llamastream", "--restart", "--slots", "2", "--n-ctx", "512"]
    cmd += ["--conversations", "3", "--turns", "2", "--reply-tokens", "4", "--timeout", "60"]
    cmd += ["--name", "restart", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "restart.md").read_text()
    assert "- Command: `python scripts/bench.py" in report
    row = next(line for line in report.splitlines() if line.startswith("| llamastream |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert all(float(c) > 0 for c in cells[:4])  # TTFTs and the after / before ratio
