"""Instructions per message, campaignd beside the raw client, counted by valgrind: the same
figure whatever else the machine is doing.

    python bench/instructions.py [--small N] [--large N] [--concurrency C] [--batch-size B]
                                 [--simulate-caches] [--keep-workdir]

Wall-clock ratios (``throughput.py``) move with a shared machine's load, and on this project's
VMs py-spy is biased toward system calls (a process is stopped where it next leaves the
kernel). Instruction counts are exact and repeatable. So this runs the raw blast and one
``campaignd run`` under ``valgrind --tool=callgrind``, each twice, for ``--small`` and for
``--large`` messages, and prints the difference divided by the difference in messages: what
one more message costs, start-up and shutdown cancelled out. The daemon's figure covers all
it does per message (claims, requests, outcome writes, counters); PostgreSQL and the sink
are not counted.

``raw / campaignd`` instructions is the throughput ratio a machine would show if time
followed instructions; the wall-clock ratio is lower where campaignd's instructions run
slower than the client's (cache misses, branches: ``--simulate-caches`` models them, at
about twice the run time). valgrind runs code ~50-100x slower: the defaults (1,000 and
4,000 messages) take about 2 minutes, 6 with ``--simulate-caches``. Needs valgrind (Debian:
``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from _common import (
    BENCH_DIR,
    Daemon,
    Postgres,
    Sink,
    bench_workdir,
    clone_database,
    create_template,
    drop_database,
    embedded_postgres,
    ready_campaign,
    wait_daemon_listening,
    write_daemon_config,
    zero_cost_sink,
)
from campaignd import db
from campaignd.config import DatabaseConfig

TEMPLATE_DB = "bench_instructions_template"
# Each run waits at most this long: valgrind slows everything down ~50-100x.
TIME_LIMIT_SECONDS = 1800.0
EVENT_NAMES = {
    "Ir": "instructions",
    "I1mr": "L1 instruction-cache misses",
    "D1mr": "L1 data-cache read misses",
    "D1mw": "L1 data-cache write misses",
    "Bcm": "mispredicted conditional branches",
    "Bim": "mispredicted indirect branches",
}


@dataclass(frozen=True)
class Counts:
    messages: int
    events: dict[str, int]


def callgrind(output: Path, simulate_caches: bool) -> list[str]:
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}"]
    if simulate_caches:
        command += ["--cache-sim=yes", "--branch-sim=yes"]
    return command


def read_totals(output: Path) -> dict[str, int]:
    """The program's totals from a callgrind output file (its ``events:`` and ``summary:``)."""
    names: list[str] = []
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("summary:", "totals:")) and names:
            return dict(zip(names, (int(value) for value in line.split()[1:]), strict=True))
    raise RuntimeError(f"no totals in {output}")


def count_raw(sink: Sink, messages: int, concurrency: int, workdir: Path, simulate_caches: bool) -> Counts:
    output = workdir / f"raw-{messages}.callgrind"
    blast = subprocess.run(
        [
            *callgrind(output, simulate_caches),
            sys.executable,
            str(BENCH_DIR / "_blast.py"),
            "--url",
            sink.url,
            "--count",
            str(messages),
            "--concurrency",
            str(concurrency),
            "--campaign-id",
            str(uuid.uuid4()),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=BENCH_DIR,
        timeout=TIME_LIMIT_SECONDS,
    )
    # Failed requests cost less than answered ones: a count with errors compares nothing.
    result = json.loads(blast.stdout.strip().splitlines()[-1])
    if result["ok"] != messages:
        raise RuntimeError(f"the raw blast got {result['ok']} answers of {messages}: {result}")
    return Counts(messages, read_totals(output))


async def count_campaignd(
    postgres: Postgres,
    sink: Sink,
    messages: int,
    args: argparse.Namespace,
    workdir: Path,
) -> Counts:
    name = f"bench_instructions_{messages}"
    url = await clone_database(postgres, TEMPLATE_DB, name)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    output = workdir / f"campaignd-{messages}.callgrind"
    daemon: Daemon | None = None
    try:
        campaign_id = await ready_campaign(connection, messages)
        config = write_daemon_config(
            workdir / f"{name}.toml",
            database_url=url,
            sink_url=sink.url,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
        )
        daemon = Daemon(config, workdir / f"{name}.log", prefix=callgrind(output, args.simulate_caches))
        await wait_daemon_listening(connection, daemon, limit=600.0)
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id
        )
        deadline = time.monotonic() + TIME_LIMIT_SECONDS
        while True:
            row = await connection.fetchrow(
                "SELECT status, sent_count FROM campaignd.campaigns WHERE id = $1", campaign_id
            )
            assert row is not None
            if row["status"] not in ("sending", "draft"):
                break
            if not daemon.alive():
                raise RuntimeError(f"campaignd exited during the run:\n{daemon.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"campaign not completed in time:\n{daemon.log_tail()}")
            await asyncio.sleep(0.2)
        if row["sent_count"] != messages:
            raise RuntimeError(f"campaignd sent {row['sent_count']} of {messages}")
        code = daemon.stop(timeout=300.0)
        daemon = None
        if code != 0:
            raise RuntimeError(f"campaignd exited with code {code} after SIGTERM")
        return Counts(messages, read_totals(output))
    finally:
        if daemon is not None:
            daemon.stop()
        await connection.close()
        await drop_database(postgres, name)


def per_message(small: Counts, large: Counts, event: str) -> float:
    return (large.events[event] - small.events[event]) / (large.messages - small.messages)


def report(raw: tuple[Counts, Counts], campaignd: tuple[Counts, Counts]) -> None:
    events = [event for event in EVENT_NAMES if event in raw[0].events]
    print(f"\nper message, from {raw[0].messages:,} and {raw[1].messages:,} messages each")
    print(f"{'event':<36} {'raw':>12} {'campaignd':>12} {'raw/campaignd':>14}")
    for event in events:
        raw_each = per_message(*raw, event)
        daemon_each = per_message(*campaignd, event)
        ratio = raw_each / daemon_each if daemon_each else float("nan")
        print(f"{EVENT_NAMES[event]:<36} {raw_each:12,.0f} {daemon_each:12,.0f} {ratio:14.3f}")


async def main_async(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    await create_template(postgres, TEMPLATE_DB)
    raw: list[Counts] = []
    campaignd: list[Counts] = []
    for messages in (args.small, args.large):
        started = time.monotonic()
        raw.append(
            await asyncio.to_thread(
                count_raw, sink, messages, args.concurrency, workdir, args.simulate_caches
            )
        )
        print(f"  raw, {messages:,} messages: {time.monotonic() - started:.0f} s under valgrind", flush=True)
        started = time.monotonic()
        campaignd.append(await count_campaignd(postgres, sink, messages, args, workdir))
        print(
            f"  campaignd, {messages:,} messages: {time.monotonic() - started:.0f} s under valgrind",
            flush=True,
        )
    report((raw[0], raw[1]), (campaignd[0], campaignd[1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=1000, help="messages in the smaller run (1000)")
    parser.add_argument("--large", type=int, default=4000, help="messages in the larger run (4000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent requests (64)")
    parser.add_argument("--batch-size", type=int, default=1000, help="campaignd [dispatch] batch_size (1000)")
    parser.add_argument(
        "--simulate-caches", action="store_true", help="also count cache misses and branch mispredictions"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep callgrind outputs and daemon logs")
    args = parser.parse_args()
    if not 1 <= args.small < args.large:
        parser.error("need 1 <= --small < --large")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    with (
        bench_workdir("campaignd-instructions-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
        zero_cost_sink(workdir / "sink") as sink,
    ):
        print(f"sink: {sink.kind}; C={args.concurrency}, batch_size={args.batch_size}", flush=True)
        asyncio.run(main_async(args, postgres, sink, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
