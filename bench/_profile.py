"""Summarise py-spy ``--format raw`` profiles (folded stacks), and set the daemon's beside the
raw client's.

Each sample's "self" time goes to the library of its innermost Python frame; with
``--native`` a sample inside the cyclic garbage collector goes to "garbage collector"
instead, and C frames are charged to the Python frame that called them (a ``write`` to the
socket counts for aiohttp's writer). "Inclusive" counts a sample once for every library
on the running task's stack: self time says where the CPU goes, inclusive on whose behalf.
Multiplying a share by the measured CPU seconds per message gives microseconds per
message, which is what can be compared between the daemon and the raw client.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# py-spy names files by their path below site-packages or the stdlib ("aiohttp/client.py",
# "asyncio/runners.py"), so the first path component names the library.
CATEGORIES: dict[str, str] = {
    "campaignd": "campaignd",
    "asyncpg": "asyncpg",
    "aiohttp": "aiohttp (+yarl, multidict)",
    "yarl": "aiohttp (+yarl, multidict)",
    "multidict": "aiohttp (+yarl, multidict)",
    "aiohappyeyeballs": "aiohttp (+yarl, multidict)",
    "structlog": "structlog",
    "prometheus_client": "prometheus_client",
    "asyncio": "event loop (asyncio, uvloop)",
    "uvloop": "event loop (asyncio, uvloop)",
    "selectors.py": "event loop (asyncio, uvloop)",
}
OTHER = "other Python (stdlib, dataclasses, ...)"
GC = "garbage collector (native frames only)"
LOOP = "event loop (asyncio, uvloop)"
# With uvloop, a sample whose innermost Python frame is the runner is time in the loop's C
# code (polling, transports, task steps); the frames below it are on every stack. A sample
# without it, or inside an import, is start-up or shutdown, not per-message work (the raw
# client is sampled from its first instruction).
LOOP_ROOT = "Runner.run (asyncio/runners.py"


def _frame_parts(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("function"), match.group("file")


def _is_python(frame: str) -> bool:
    file = _frame_parts(frame)[1]
    return file.endswith(".py") or file.startswith(("<frozen", "<string>"))


def category(frame: str) -> str:
    file = _frame_parts(frame)[1]
    first = file.lstrip("/").split("/", 1)[0]
    return CATEGORIES.get(first, OTHER)


def _short(frame: str) -> str:
    function, file = _frame_parts(frame)
    return f"{function} ({file})"


@dataclass
class Profile:
    samples: int = 0
    startup_samples: int = 0
    self_by_category: Counter[str] = field(default_factory=Counter)
    inclusive_by_category: Counter[str] = field(default_factory=Counter)
    self_by_function: Counter[str] = field(default_factory=Counter)
    inclusive_campaignd: Counter[str] = field(default_factory=Counter)


def parse(path: Path) -> Profile:
    profile = Profile()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame]
        roots = [index for index, frame in enumerate(frames) if frame.startswith(LOOP_ROOT)]
        task_frames = frames[roots[-1] + 1 :] if roots else frames
        if not roots or any(frame.startswith("_find_and_load") for frame in frames):
            profile.startup_samples += count
            continue
        python_frames = [frame for frame in frames if _is_python(frame)]
        if not python_frames:
            continue
        profile.samples += count
        innermost = python_frames[-1]
        if any(frame.startswith("gc_collect") for frame in frames):
            self_category = GC
        elif innermost.startswith(LOOP_ROOT):
            self_category = LOOP
        else:
            self_category = category(innermost)
        profile.self_by_category[self_category] += count
        profile.self_by_function[_short(innermost) if self_category != GC else GC] += count
        python_task_frames = [frame for frame in task_frames if _is_python(frame)]
        for name in {category(frame) for frame in python_task_frames}:
            profile.inclusive_by_category[name] += count
        for name in {_short(f) for f in python_task_frames if category(f) == "campaignd"}:
            profile.inclusive_campaignd[name] += count
    return profile


def report(profile: Profile, cpu_ms_per_message: float, top: int = 15) -> str:
    if not profile.samples:
        return "no samples"
    total = profile.samples

    def share(count: int) -> str:
        fraction = count / total
        return f"{100.0 * fraction:5.1f}% {1000.0 * fraction * cpu_ms_per_message:6.1f} us/msg"

    lines = [
        f"{total} samples (idle and {profile.startup_samples} start-up samples excluded);"
        f" CPU {1000.0 * cpu_ms_per_message:.0f} us/msg measured in this run",
        "",
        "self time by library:",
    ]
    lines += [f"  {share(n)}  {name}" for name, n in profile.self_by_category.most_common()]
    lines += ["", "inclusive (library anywhere on the running task's stack):"]
    lines += [f"  {share(n)}  {name}" for name, n in profile.inclusive_by_category.most_common()]
    lines += ["", f"top {top} innermost Python frames:"]
    lines += [f"  {share(n)}  {name}" for name, n in profile.self_by_function.most_common(top)]
    if profile.inclusive_campaignd:
        lines += ["", f"top {top} campaignd functions, inclusive:"]
        lines += [f"  {share(n)}  {name}" for name, n in profile.inclusive_campaignd.most_common(top)]
    return "\n".join(lines)


def compare(daemon: Profile, daemon_ms: float, raw: Profile, raw_ms: float) -> str:
    """Self time per message, library by library: where the daemon spends more than the raw client."""
    names = sorted(
        set(daemon.self_by_category) | set(raw.self_by_category),
        key=lambda name: -daemon.self_by_category[name],
    )

    def us(profile: Profile, ms: float, name: str) -> float:
        return 1000.0 * ms * profile.self_by_category[name] / max(1, profile.samples)

    lines = [f"{'self time, us/msg':<42} {'campaignd':>10} {'raw':>8} {'extra':>8}"]
    for name in names:
        ours, theirs = us(daemon, daemon_ms, name), us(raw, raw_ms, name)
        lines.append(f"{name:<42} {ours:>10.1f} {theirs:>8.1f} {ours - theirs:>+8.1f}")
    lines.append(
        f"{'total (measured CPU)':<42} {1000.0 * daemon_ms:>10.1f} {1000.0 * raw_ms:>8.1f}"
        f" {1000.0 * (daemon_ms - raw_ms):>+8.1f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python bench/_profile.py PROFILE.txt CPU_MS_PER_MESSAGE")
    print(report(parse(Path(sys.argv[1])), float(sys.argv[2])))
