"""Counts what a process asks of its event loop, for ``throughput.py --count-wakeups``.

On ``PYTHONPATH`` (this folder) with ``BENCH_COUNT_WAKEUPS`` set to a file prefix, every
``uvloop.run`` in the process runs on a loop that counts its ``call_soon`` callbacks (a task
woken by a future, a task's next step), timers and tasks, by the callback's or coroutine's
name, and writes them to ``PREFIX.PID`` as JSON at exit. The I/O callbacks uvloop makes in C
(a socket became readable) do not go through these methods and are not counted.

Python-level overrides slow the counted process: its counts are figures, its speed is not.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
from typing import Any


def _name(thing: object) -> str:
    return str(getattr(thing, "__qualname__", type(thing).__name__))


def _install(prefix: str) -> None:
    import uvloop

    counts: collections.Counter[str] = collections.Counter()

    class CountingLoop(uvloop.Loop):  # type: ignore[misc]
        def call_soon(self, callback: Any, *args: Any, context: Any = None) -> Any:
            counts["call_soon " + _name(callback)] += 1
            return super().call_soon(callback, *args, context=context)

        def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
            counts["timer " + _name(callback)] += 1
            return super().call_at(when, callback, *args, context=context)

        def create_task(self, coro: Any, *, name: Any = None, context: Any = None) -> Any:
            counts["task " + _name(coro)] += 1
            return super().create_task(coro, name=name, context=context)

    original_run = uvloop.run

    def run(main: Any, *, loop_factory: Any = None, **kwargs: Any) -> Any:
        return original_run(main, loop_factory=CountingLoop, **kwargs)

    uvloop.run = run

    def write() -> None:
        with open(f"{prefix}.{os.getpid()}", "w") as out:
            json.dump({"argv": sys.argv, "counts": dict(counts)}, out)

    atexit.register(write)


if _prefix := os.environ.get("BENCH_COUNT_WAKEUPS"):
    _install(_prefix)
