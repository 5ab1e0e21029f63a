"""How many threads torch uses on the CPU.

torch sizes its thread pool by the CPUs the machine shows, not by the CPUs this process may use: in a
container limited to 2 CPUs on a 64-CPU host it starts dozens of threads that fight over two cores, which
makes small models an order of magnitude slower. nvila-ft sizes it by what the process may really use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from nvila_ft.training.config import ConfigError


CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota when there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(count, quota) if quota else count)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """cgroup v2 `cpu.max` (or v1 cfs quota / period) rounded up; None when unlimited or unknown."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def set_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS when a launcher set it (torchrun sets 1 per
    process), else the usable CPUs. Returns the number set."""
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"cpu_threads = {threads!r}: must be an integer >= 1 (or null for every usable CPU)")
    torch.set_num_threads(threads)
    return threads
