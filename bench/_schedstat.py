"""Time a process spent runnable but not running: waiting for a CPU another process held.

Read from ``/proc/PID/task/*/schedstat`` (on-CPU ns, run-queue wait ns, time slices), summed
over the process's threads. With a process's CPU time and a wall-clock window, it splits the
window into on a CPU, waiting for one, and idle (waiting for I/O: the sink, the database).
Kept free of imports beyond the standard library: the raw blast process loads it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_wait_seconds(pid: int | None = None) -> float:
    """Run-queue wait of every thread of ``pid`` (this process by default) so far; 0.0 where
    the kernel does not keep it (no schedstats, not Linux)."""
    total = 0
    for stat in Path(f"/proc/{pid or os.getpid()}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            # A thread that ended between the listing and the read.
            continue
    return total / 1e9
