"""campaignd beside two general-purpose Postgres job queues and the raw HTTP ceiling, in one run.

    python bench/queues.py --setup             # once, from the project's venv: makes the benchmark venv
    /tmp/bench-queues-venv/bin/python bench/queues.py [--recipients N] [--procrastinate-recipients M]
                                                      [--concurrency C] [--rounds R] [--quiet-wait S]

The goals (project issue on performance), on the same zero-cost sink, body size and
concurrency: campaignd >= 1.5 x pgqueuer and >= 8 x procrastinate, each doing one POST per
job, and (as bench/throughput.py measures it) campaignd >= 0.75 x the raw aiohttp blast.

pgqueuer and procrastinate are not campaignd dependencies: they live only in the benchmark's
own virtualenv, which --setup creates (campaignd installed editable, plus both queues).
Each round measures, one after the other: the raw blast, one `campaignd run`, pgqueuer and
procrastinate, each queue in a fresh database of the same embedded PostgreSQL (default
durability), its jobs enqueued in bulk before the clock starts (the enqueue time is printed
apart), the clock running from the start of processing until all N are done. procrastinate
runs a smaller N by default (it does about 1,000 jobs/s on the reference machine): msgs/s is
what is compared. See bench/README.md for every column.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from _common import (
    BENCH_DIR,
    MachineLoad,
    Postgres,
    Sink,
    bench_workdir,
    clone_database,
    drop_database,
    embedded_postgres,
    quiet_moment,
    tree_cpu,
    zero_cost_sink,
)
from throughput import (
    begin_run,
    measure_campaignd,
    measure_raw,
    per_k,
    per_message,
    served,
)

DEFAULT_VENV = Path("/tmp/bench-queues-venv")
# Versions the reference figures were taken with.
QUEUE_PACKAGES = ["pgqueuer>=1.6,<1.7", "procrastinate>=3,<4"]
TARGETS = {"raw": 0.75, "pgqueuer": 1.5, "procrastinate": 8.0}
BATCH_SIZE = 1000  # campaignd's [dispatch] batch_size, as bench/throughput.py uses by default


@dataclass
class Measurement:
    """One system's figures in one round, whatever the system."""

    system: str
    count: int
    rate: float
    elapsed: float
    enqueue_seconds: float | None
    client_cpu: float
    pg_cpu: float | None
    wal_bytes: int | None
    others_cores: float
    steal_cores: float
    sink_requests: int | None
    problems: list[str]


# ------------------------------------------------------------------ setup


def setup(venv: Path) -> int:
    """The benchmark's own environment: campaignd (editable) plus the two queues, nowhere else."""
    repository = BENCH_DIR.parent
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-e", f"{repository}[embedded]", "psutil", *QUEUE_PACKAGES], check=True)
    print(f"benchmark environment ready: {venv}\nnow run: {venv}/bin/python {BENCH_DIR / 'queues.py'}")
    return 0


def missing_queues() -> list[str]:
    return [name for name in ("pgqueuer", "procrastinate") if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------ measurements


async def measure_queue(
    postgres: Postgres,
    sink: Sink,
    *,
    system: str,
    count: int,
    concurrency: int,
    name: str,
    time_limit: float,
    quiet_wait: float,
) -> Measurement:
    """One queue (bench/_queue_worker.py in its own process) through count jobs, fresh database."""
    url = await clone_database(postgres, "template1", name)
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH_DIR / "_queue_worker.py"),
        "--system",
        system,
        "--dsn",
        url,
        "--url",
        sink.url,
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
        "--campaign-id",
        str(uuid.uuid4()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert worker.stdin is not None and worker.stdout is not None
    connection = await asyncpg.connect(url)
    try:
        enqueued = await asyncio.wait_for(worker.stdout.readline(), timeout=time_limit)
        if not enqueued:
            raise RuntimeError(f"{system} worker exited before enqueueing (code {await worker.wait()})")
        enqueue_seconds = float(json.loads(enqueued)["enqueue_seconds"])
        # The same starting state campaignd's rounds get: statistics and a checkpoint.
        await connection.execute("ANALYZE")
        await connection.execute("CHECKPOINT")
        await quiet_moment(quiet_wait)

        wal_before = await connection.fetchval("SELECT pg_current_wal_lsn()")
        pg_before, sink_before = tree_cpu(postgres.pid), sink.cpu()
        requests_before = sink.requests()
        load = MachineLoad()
        worker.stdin.write(b"go\n")
        await worker.stdin.drain()
        finished = await asyncio.wait_for(worker.stdout.readline(), timeout=time_limit)
        if not finished:
            raise RuntimeError(f"{system} worker exited during the run (code {await worker.wait()})")
        result = json.loads(finished)
        # The worker closes its connections as it exits: wait until the postmaster has reaped
        # their backends, else their CPU is in neither the live nor the reaped counters.
        await asyncio.wait_for(worker.wait(), timeout=30)
        await asyncio.sleep(0.3)

        pg_cpu = tree_cpu(postgres.pid) - pg_before
        worker_cpu = float(result["cpu_seconds"])
        sink_cpu = sink.cpu() - sink_before
        others, steal = load.finish(pg_cpu + worker_cpu + sink_cpu)
        requests = served(requests_before, sink.requests())
        wal_bytes = int(
            await connection.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal_before)
        )
        problems = []
        if result["ok"] != count or result["errors"]:
            problems.append(f"{result['ok']} answered 200 of {count}, {result['errors']} errors")
        return Measurement(
            system=system,
            count=count,
            rate=count / result["elapsed"],
            elapsed=result["elapsed"],
            enqueue_seconds=enqueue_seconds,
            client_cpu=worker_cpu,
            pg_cpu=pg_cpu,
            wal_bytes=wal_bytes,
            others_cores=others,
            steal_cores=steal,
            sink_requests=requests,
            problems=problems,
        )
    finally:
        if worker.returncode is None:
            worker.stdin.close()
            try:
                await asyncio.wait_for(worker.wait(), timeout=30)
            except TimeoutError:
                worker.kill()
                await worker.wait()
        await connection.close()
        await drop_database(postgres, name)


async def one_round(
    postgres: Postgres, sink: Sink, args: argparse.Namespace, workdir: Path, index: int
) -> dict[str, Measurement]:
    count, concurrency = args.recipients, args.concurrency
    time_limit = 60.0 + count / 500
    results: dict[str, Measurement] = {}

    await quiet_moment(args.quiet_wait)
    raw = await measure_raw(sink, count, concurrency, time_limit)
    results["raw"] = Measurement(
        system="raw",
        count=count,
        rate=raw.rate,
        elapsed=raw.elapsed,
        enqueue_seconds=None,
        client_cpu=raw.client_cpu,
        pg_cpu=None,
        wal_bytes=None,
        others_cores=raw.others_cores,
        steal_cores=raw.steal_cores,
        sink_requests=raw.sink_requests,
        problems=[f"{raw.errors} errors"] if raw.errors else [],
    )

    run = await measure_campaignd(
        postgres,
        sink,
        count=count,
        concurrency=concurrency,
        batch_size=BATCH_SIZE,
        workdir=workdir,
        name=f"bench_campaignd_{index}",
        time_limit=time_limit,
        quiet_wait=args.quiet_wait,
    )
    problems = []
    if run.sent != count or run.status != "completed":
        problems.append(f"campaign ended {run.status} with {run.sent}/{count} sent")
    if run.daemon_events:
        problems.append(", ".join(f"{event} x{n}" for event, n in sorted(run.daemon_events.items())))
    results["campaignd"] = Measurement(
        system="campaignd",
        count=count,
        rate=run.rate,
        elapsed=run.elapsed,
        # Recipients are loaded with COPY before the clock, like the queues' bulk enqueue; the
        # benchmark does not time that load (bench/bulk_create.py does).
        enqueue_seconds=None,
        client_cpu=run.daemon_cpu,
        pg_cpu=run.pg_cpu,
        wal_bytes=run.wal_bytes,
        others_cores=run.others_cores,
        steal_cores=run.steal_cores,
        sink_requests=run.sink_requests,
        problems=problems,
    )

    for system, system_count in (("pgqueuer", count), ("procrastinate", args.procrastinate_recipients)):
        results[system] = await measure_queue(
            postgres,
            sink,
            system=system,
            count=system_count,
            concurrency=concurrency,
            name=f"bench_{system}_{index}",
            # procrastinate may run well under 1,000 jobs/s on a busy machine.
            time_limit=120.0 + system_count / 100,
            quiet_wait=args.quiet_wait,
        )
    line = ", ".join(
        f"{m.system} {m.rate:,.0f} msg/s ({m.count} in {m.elapsed:.2f} s)" for m in results.values()
    )
    print(f"  [round {index}] {line}", flush=True)
    return results


# ------------------------------------------------------------------ reporting


def print_report(rounds: list[dict[str, Measurement]]) -> None:
    print(
        f"\n{'round':>5} {'system':<14} {'N':>7} {'msgs/s':>8} {'elapsed s':>9} {'enqueue s':>9}"
        f" {'client cpu s/1k':>15} {'PG cpu s/1k':>11} {'WAL B/msg':>9} {'other load':>10}"
        f" {'steal':>6} {'sink req/msg':>12}"
    )
    for index, results in enumerate(rounds, 1):
        for m in results.values():
            enqueue = "-" if m.enqueue_seconds is None else f"{m.enqueue_seconds:.2f}"
            pg = "-" if m.pg_cpu is None else f"{per_k(m.pg_cpu, m.count):.3f}"
            wal = "-" if m.wal_bytes is None else f"{m.wal_bytes / m.count:,.0f}"
            print(
                f"{index:>5} {m.system:<14} {m.count:>7} {m.rate:>8,.0f} {m.elapsed:>9.2f} {enqueue:>9}"
                f" {per_k(m.client_cpu, m.count):>15.3f} {pg:>11} {wal:>9} {m.others_cores:>10.2f}"
                f" {m.steal_cores:>6.2f} {per_message(m.sink_requests, m.count):>12}"
            )
            for problem in m.problems:
                print(f"{'':>5}   {m.system}: {problem}")

    print("\nratios of msgs/s (per round; the queues may run a smaller N, rates are what is compared):")
    print(f"{'round':>5} " + " ".join(f"{'campaignd/' + other:>24}" for other in TARGETS))
    for index, results in enumerate(rounds, 1):
        ratios = " ".join(f"{results['campaignd'].rate / results[other].rate:>24.2f}" for other in TARGETS)
        print(f"{index:>5} {ratios}")
    for other, target in TARGETS.items():
        ratios = [results["campaignd"].rate / results[other].rate for results in rounds]
        median = statistics.median(ratios)
        verdict = "MET" if median >= target else "NOT MET"
        print(
            f"campaignd/{other}: median {median:.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
            f" vs target >= {target} -> {verdict}"
        )
    for system in rounds[0]:
        rates = [results[system].rate for results in rounds]
        median = statistics.median(rates)
        print(f"  {system:<14} median {median:>8,.0f} msgs/s (range {min(rates):,.0f}-{max(rates):,.0f})")


def describe(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    print(f"  queues        pgqueuer {version('pgqueuer')}, procrastinate {version('procrastinate')}")
    print(
        f"  workload      N={args.recipients} (procrastinate N={args.procrastinate_recipients}),"
        f" C={args.concurrency} for every system, rounds={args.rounds}"
    )
    print(f"  raw           bench/_blast.py: aiohttp, {args.concurrency} workers, no database")
    print(
        f"  campaignd     one `campaignd run`, concurrency {args.concurrency}, batch_size {BATCH_SIZE};"
        " clock from status='sending' to 'completed'"
    )
    print(
        f"  pgqueuer      one job per message (payload = the body), AsyncpgDriver, max_concurrent_tasks"
        f" {args.concurrency}, batch_size {args.concurrency // 2}, drain mode; clock from run() to its return"
    )
    print(
        f"  procrastinate one task per message, PsycopgConnector (pool 4-20), run_worker_async(concurrency="
        f"{args.concurrency}, wait=False); clock from start to return"
    )
    print("  all          one shared aiohttp session per process, TCPConnector(limit=C), uvloop, own process")


async def main_async(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    await begin_run("campaignd vs job queues benchmark", postgres, sink)
    describe(args)
    print(flush=True)
    rounds = [await one_round(postgres, sink, args, workdir, index) for index in range(1, args.rounds + 1)]
    print_report(rounds)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (1 min)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup", action="store_true", help="create the benchmark venv (--venv) and exit")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"for --setup ({DEFAULT_VENV})")
    parser.add_argument(
        "--recipients", type=int, default=20_000, help="N for raw, campaignd, pgqueuer (20000)"
    )
    parser.add_argument(
        "--procrastinate-recipients", type=int, default=5_000, help="N for procrastinate, the slow one (5000)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent requests, every system (64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all four (2)")
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="wait up to S s for an idle machine before each (10)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    args = parser.parse_args()
    if args.setup:
        return setup(args.venv)
    if missing := missing_queues():
        print(
            f"{', '.join(missing)} not importable from {sys.executable}: they are installed only in the"
            f" benchmark's own venv.\n  python3 bench/queues.py --setup    # creates {DEFAULT_VENV}\n"
            f"  {DEFAULT_VENV}/bin/python bench/queues.py",
            file=sys.stderr,
        )
        return 2
    with (
        bench_workdir("campaignd-queues-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
        zero_cost_sink(workdir / "sink") as sink,
    ):
        asyncio.run(main_async(args, postgres, sink, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
