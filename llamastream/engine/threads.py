"""How many CPU threads a worker's llama.cpp context decodes with, when no setting says.

llama.cpp's own context default is 4 threads whatever the machine: it oversubscribes a 2-core
container and leaves most of a 16-core host idle. Like llama-server, generation gets one thread
per physical core (hyper-thread siblings share a core's arithmetic units and slow each other
down in the matrix products), and prompt batches, which are compute-bound, every logical CPU.
Both count only the CPUs this process may run on: its affinity mask and its cgroup's CPU quota
(a container often sees the host's cores but may use fewer).

With every layer on a GPU the CPU threads only feed the GPU (token embeddings, the graph's few
CPU operations); more of them spin without work and take cores from sampling, so a worker then
uses at most `GPU_THREADS`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

GPU_THREADS = 4  # threads of a worker whose layers are all on a GPU
_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
_PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuSet:
    """The CPUs this process may use: logical CPUs and the physical cores they belong to."""

    logical: int
    physical: int

    @classmethod
    def current(cls) -> CpuSet:
        """Read from the affinity mask, the CPU topology and the cgroup quota."""
        cpus = _affinity()
        cores = _physical_cores(cpus)
        quota = _cgroup_quota()
        logical = len(cpus) if quota is None else max(1, min(len(cpus), quota))
        return cls(logical=logical, physical=max(1, min(cores, logical)))


class ThreadPlan(NamedTuple):
    """A worker's ``n_threads`` (generation) and ``n_threads_batch`` (prompts), and why."""

    n_threads: int
    n_threads_batch: int
    reason: str


def plan_threads(
    cpus: CpuSet,
    *,
    n_threads: int | None,
    n_threads_batch: int | None,
    workers_on_cpu: int,
    all_on_gpu: bool,
) -> ThreadPlan:
    """Thread counts of one worker: the settings where given, else derived from ``cpus``.

    ``workers_on_cpu`` workers share the CPUs (several workers split them evenly).

    >>> plan_threads(CpuSet(32, 16), n_threads=None, n_threads_batch=None,
    ...              workers_on_cpu=1, all_on_gpu=False)[:2]
    (16, 32)
    >>> plan_threads(CpuSet(32, 16), n_threads=None, n_threads_batch=None,
    ...              workers_on_cpu=1, all_on_gpu=True)[:2]
    (4, 4)
    >>> plan_threads(CpuSet(2, 2), n_threads=3, n_threads_batch=None,
    ...              workers_on_cpu=1, all_on_gpu=False)[:2]
    (3, 3)
    """
    share = max(1, workers_on_cpu)
    physical = max(1, cpus.physical // share)
    logical = max(1, cpus.logical // share)
    where = f"{cpus.physical} physical core(s), {cpus.logical} logical CPU(s) usable"
    if share > 1:
        where += f", shared by {share} workers"
    if all_on_gpu:
        gen, batch = min(GPU_THREADS, physical), min(GPU_THREADS, physical)
        why = f"every layer on a GPU: at most {GPU_THREADS} ({where})"
    else:
        gen, batch = physical, logical
        why = f"generation: physical cores, prompts: logical CPUs ({where})"
    if n_threads is not None:
        gen = n_threads
        why = f"n_threads set; {why}"
    if n_threads_batch is not None:
        batch = n_threads_batch
        why = f"n_threads_batch set; {why}"
    elif n_threads is not None:
        batch = n_threads  # one explicit count serves both, as before n_threads_batch existed
    return ThreadPlan(gen, batch, why)


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int:
    """Distinct (package, core) pairs among ``cpus``; ``len(cpus)`` when the topology is hidden."""
    cores = set()
    for cpu in cpus:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def _cgroup_quota() -> int | None:
    """CPUs the process's cgroup quota allows, rounded up; None without a quota.

    cgroup v2: ``cpu.max`` of the process's own cgroup (``/proc/self/cgroup``), else of the
    root; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    for path in _cpu_max_files():
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return _cpus(quota, period)
    try:
        quota = (_CGROUP_V1 / "cpu.cfs_quota_us").read_text().strip()
        period = (_CGROUP_V1 / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _cpus(quota, period)


def _cpu_max_files() -> list[Path]:
    files = []
    try:
        for line in _PROC_CGROUP.read_text().splitlines():
            if line.startswith("0::"):
                files.append(_CGROUP_CPU_MAX.parent / line[3:].strip("/") / "cpu.max")
    except OSError:
        pass
    return [*files, _CGROUP_CPU_MAX]


def _cpus(quota: str, period: str) -> int | None:
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None
