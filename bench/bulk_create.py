"""Bulk creation: ``campaignd campaign create`` loading a CSV of recipients with COPY.

    python bench/bulk_create.py [--rows 1000000] [--rounds 2]

Target (the performance issue): 1,000,000 rows in under 30 s on this machine. Embedded
PostgreSQL at default durability (fsync on), a fresh migrated database per round, and the
command run as a user runs it (``python -m campaignd campaign create … --start``, interpreter
start-up included). The CSV has an address and two variable columns, like a real export.

Printed per round: wall time and rows/s of the whole command, its CPU and peak RSS (the
load streams, so the peak must not grow with the file), PostgreSQL's CPU, WAL bytes per row.
Before the rounds, the CSV parsing and row checks alone (no database) are timed in process:
the share of the command that is campaignd's own Python.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson

from _common import (
    PostgresCpu,
    bench_workdir,
    clone_database,
    create_template,
    drop_database,
    embedded_postgres,
    quiet_moment,
    refresh_settings,
    register_sender,
    toml_value,
    tree_cpu,
)
from _payload import MESSAGE_TEMPLATE, SENDER_ID
from campaignd.bulkload import Tally, open_recipients, recipients
from campaignd.logs import configure_logging

TEMPLATE_DB = "bench_bulk_template"
TARGET_SECONDS = 30.0


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("address,name,city\n")
        for start in range(0, rows, 100_000):
            handle.writelines(
                f"+1555{i:07d},Name {i},Zürich {i % 97}\n" for i in range(start, min(rows, start + 100_000))
            )


def parse_only(path: Path) -> tuple[float, int]:
    """Seconds to read, check and shape every row without a database."""
    started = time.perf_counter()
    tally = Tally()
    with open_recipients(path) as (header, records):
        for _ in recipients(records, header, tally, stop_at_bad=False):
            pass
    return time.perf_counter() - started, tally.loaded


def run_command(config: Path, message: Path, csv_path: Path) -> tuple[float, int, float, int, str]:
    """(wall seconds, exit code, CPU seconds, peak RSS in KiB, output) of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "campaignd", "campaign", "create", "--config", str(config),
         "--sender", SENDER_ID, "--message", str(message), "--recipients", str(csv_path), "--start"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read().decode()
    # wait4 gives this child's own rusage: its peak RSS and CPU, however short-lived.
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, output


async def main_async(args: argparse.Namespace, workdir: Path) -> int:
    configure_logging("console", "warning")
    csv_path = workdir / "recipients.csv"
    message = workdir / "message.json"
    message.write_bytes(orjson.dumps(MESSAGE_TEMPLATE))
    write_csv(csv_path, args.rows)
    size_mb = csv_path.stat().st_size / 1e6
    parse_seconds, parsed = parse_only(csv_path)
    print(f"CSV: {args.rows:,} rows, {size_mb:.1f} MB; {os.cpu_count()} CPUs")
    print(
        f"parse + check only (no database, in process): {parse_seconds:.2f} s, "
        f"{parsed / parse_seconds:,.0f} rows/s",
        flush=True,
    )
    failures = 0
    with embedded_postgres(workdir) as postgres:
        await refresh_settings(postgres)
        settings = ", ".join(f"{k}={v}" for k, v in postgres.durability.items())
        print(f"PostgreSQL {postgres.version}: {settings}")
        await create_template(postgres, TEMPLATE_DB)
        results: list[float] = []
        for index in range(1, args.rounds + 1):
            name = f"bench_bulk_{index}"
            url = await clone_database(postgres, TEMPLATE_DB, name)
            connection = await asyncpg.connect(url)
            try:
                await register_sender(connection)
                config = workdir / "bulk.toml"
                config.write_text(f"[database]\nurl = {toml_value(url)}\n")
                await quiet_moment(args.quiet_wait)
                wal_before = await connection.fetchval("SELECT pg_current_wal_lsn()")
                pg_cpu = PostgresCpu(postgres.pid)
                pg_before = tree_cpu(postgres.pid)
                elapsed, code, cpu, peak_kib, output = run_command(config, message, csv_path)
                pg_seconds = tree_cpu(postgres.pid) - pg_before
                pg_roles = pg_cpu.finish()
                wal = await connection.fetchval(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal_before
                )
                loaded = await connection.fetchval("SELECT count(*) FROM campaignd.recipients")
            finally:
                await connection.close()
            await drop_database(postgres, name)
            if code != 0 or loaded != args.rows:
                failures += 1
                print(f"  round {index}: FAILED (exit {code}, {loaded:,} rows in the table)\n{output}")
                continue
            results.append(elapsed)
            busiest = ", ".join(
                f"{role} {seconds:.1f}" for role, seconds in sorted(pg_roles.items(), key=lambda r: -r[1])[:3]
            )
            print(
                f"  round {index}: {elapsed:.2f} s, {args.rows / elapsed:,.0f} rows/s;"
                f" command CPU {cpu:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB;"
                f" PostgreSQL CPU {pg_seconds:.1f} s ({busiest});"
                f" WAL {float(wal) / args.rows:.0f} B/row",
                flush=True,
            )
        if results:
            best, worst = min(results), max(results)
            verdict = "MET" if worst < TARGET_SECONDS else "NOT MET"
            if args.rows != 1_000_000:
                verdict = "not judged (the target is for --rows 1000000)"
            print(
                f"\n{args.rows:,} rows: {best:.2f}-{worst:.2f} s ({args.rows / worst:,.0f}-"
                f"{args.rows / best:,.0f} rows/s); target < {TARGET_SECONDS:.0f} s for 1M rows: {verdict}"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="recipients in the CSV (1000000)")
    parser.add_argument("--rounds", type=int, default=2, help="loads, each into a fresh database (2)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="wait up to this long for an idle machine per round (10)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the CSV and configs")
    args = parser.parse_args()
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    with bench_workdir("campaignd-bench-bulk-", keep=args.keep_workdir) as workdir:
        return asyncio.run(main_async(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
