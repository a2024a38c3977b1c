"""Thread counts of a worker's context: the settings, else the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from llamastream.engine import threads
from llamastream.engine.threads import CpuSet, plan_threads
from llamastream.engine.worker import Worker


def _topology(root: Path, cores: list[tuple[int, int]]) -> None:
    """A sysfs CPU tree: logical CPU i on (package, core) ``cores[i]``."""
    for cpu, (package, core) in enumerate(cores):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


@pytest.fixture(autouse=True)
def _no_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own cgroup files, none unless a test writes them."""
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", tmp_path / "cgroup" / "cpu.max")
    monkeypatch.setattr(threads, "_CGROUP_V1", tmp_path / "cgroup-v1")
    monkeypatch.setattr(threads, "_PROC_CGROUP", tmp_path / "proc-self-cgroup")


def test_hyperthread_siblings_count_as_one_physical_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 logical CPUs: 2 packages x 2 cores x 2 hyper-threads.
    _topology(tmp_path, [(p, c) for _ in range(2) for p in range(2) for c in range(2)])
    monkeypatch.setattr(threads, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(8)))
    assert CpuSet.current() == CpuSet(logical=8, physical=4)
    # An affinity mask of one hyper-thread pair is one core.
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 4})
    assert CpuSet.current() == CpuSet(logical=2, physical=1)


def test_a_cgroup_quota_caps_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _topology(tmp_path, [(0, c) for c in range(16)])
    monkeypatch.setattr(threads, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(16)))
    quota = tmp_path / "cgroup" / "cpu.max"
    quota.parent.mkdir()
    quota.write_text("250000 100000\n")  # 2.5 CPUs: 3 threads may run at once
    assert CpuSet.current() == CpuSet(logical=3, physical=3)
    quota.write_text("max 100000\n")
    assert CpuSet.current() == CpuSet(logical=16, physical=16)
    # The process's own (nested) cgroup is read first.
    (tmp_path / "proc-self-cgroup").write_text("0::/pods/llm\n")
    nested = tmp_path / "cgroup" / "pods" / "llm" / "cpu.max"
    nested.parent.mkdir(parents=True)
    nested.write_text("400000 100000\n")
    assert CpuSet.current() == CpuSet(logical=4, physical=4)


def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _topology(tmp_path, [(0, c) for c in range(8)])
    monkeypatch.setattr(threads, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(8)))
    v1 = tmp_path / "cgroup-v1"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("50000\n")
    assert CpuSet.current() == CpuSet(logical=2, physical=2)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert CpuSet.current() == CpuSet(logical=8, physical=8)


@pytest.mark.parametrize(
    ("cpus", "kwargs", "expected"),
    [
        # A 16-core host with SMT, CPU only: cores for generation, every CPU for prompts.
        (CpuSet(32, 16), {}, (16, 32)),
        # The same host with every layer on a GPU: a few threads feed it.
        (CpuSet(32, 16), {"all_on_gpu": True}, (4, 4)),
        # Eight GPUs on a 16-core host: the cores are shared, at most 4 each.
        (CpuSet(32, 16), {"all_on_gpu": True, "workers_on_cpu": 8}, (2, 2)),
        # Two CPU workers split the CPUs.
        (CpuSet(32, 16), {"workers_on_cpu": 2}, (8, 16)),
        # A 2-core container.
        (CpuSet(2, 2), {}, (2, 2)),
        (CpuSet(2, 2), {"all_on_gpu": True}, (2, 2)),
        # Settings win; n_threads alone serves prompts too.
        (CpuSet(2, 2), {"n_threads": 6}, (6, 6)),
        (CpuSet(2, 2), {"n_threads_batch": 5}, (2, 5)),
        (CpuSet(2, 2), {"n_threads": 1, "n_threads_batch": 3}, (1, 3)),
    ],
)
def test_plan(cpus: CpuSet, kwargs: dict[str, object], expected: tuple[int, int]) -> None:
    options: dict[str, object] = {
        "n_threads": None,
        "n_threads_batch": None,
        "workers_on_cpu": 1,
        "all_on_gpu": False,
        **kwargs,
    }
    plan = plan_threads(cpus, **options)  # type: ignore[arg-type]
    assert (plan.n_threads, plan.n_threads_batch) == expected
    assert plan.reason


def _context_threads(worker: Worker) -> tuple[int, int]:
    ctx = worker._ctx.ctx  # type: ignore[union-attr]
    return llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)


def test_unset_threads_never_exceed_the_usable_cores(tiny_model: Path) -> None:
    """Regression: with no setting the context kept llama.cpp's default of 4 threads, which
    oversubscribed this 2-core machine (3x slower decoding)."""
    worker = Worker(0, str(tiny_model), n_slots=1, n_ctx=256, n_batch=32)
    worker.start().result(30)
    try:
        n_threads, n_batch = _context_threads(worker)
        usable = len(os.sched_getaffinity(0))
        assert 1 <= n_threads <= usable
        assert 1 <= n_batch <= usable
        assert n_threads == CpuSet.current().physical
    finally:
        worker.stop()


_ONE_CPU = """
import os, sys
import llama_cpp
from llamastream.engine.worker import Worker
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
w = Worker(0, sys.argv[1], n_slots=1, n_ctx=256, n_batch=32)
w.start().result(30)
print(llama_cpp.llama_n_threads(w._ctx.ctx), llama_cpp.llama_n_threads_batch(w._ctx.ctx))
w.stop()
"""


def test_the_affinity_mask_is_read_not_the_cpu_count(tiny_model: Path) -> None:
    """A process allowed one CPU (as in a container pinned to it) decodes with one thread,
    whatever ``os.cpu_count()`` says of the host."""
    out = subprocess.run(
        [sys.executable, "-c", _ONE_CPU, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["1", "1"]


def test_explicit_threads_are_used(tiny_model: Path) -> None:
    worker = Worker(0, str(tiny_model), n_slots=1, n_ctx=256, n_batch=32, n_threads=3)
    worker.start().result(30)
    try:
        assert _context_threads(worker) == (3, 3)
    finally:
        worker.stop()
