"""The measured memory peak of one piece of work: what the planner is checked against.

On a GPU, `torch.cuda.max_memory_allocated` (tensor bytes the caching allocator handed out). On the CPU, the peak
of the tensor bytes in the profiler's memory timeline: like the GPU figure it counts tensors, not the process's
resident memory (which also holds the memory-mapped checkpoint, the interpreter and the allocator's reserve).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def peak_bytes(work: Callable[[], object], device: str) -> int:
    """Peak tensor bytes allocated while `work()` runs, including what was allocated before it (on a GPU: every
    live tensor; on the CPU: the tensors the profiler saw live during the work)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    _, totals = cpu_memory_timeline(work)
    return int(max(totals))


def cpu_memory_timeline(work: Callable[[], object]) -> tuple[list[int], list[int]]:
    """(times in microseconds since the epoch, as `time.time_ns() // 1000` gives them; tensor bytes live at each)
    over `work()` on the CPU, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as profiler:
        work()
    with tempfile.TemporaryDirectory() as folder:
        timeline = Path(folder) / "timeline.json"
        profiler.export_memory_timeline(str(timeline), device="cpu")
        times, sizes = json.loads(timeline.read_text())
    return [int(t) for t in times], [int(sum(row)) for row in sizes]
