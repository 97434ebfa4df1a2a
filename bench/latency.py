"""Latency-bound dispatch: one ``campaignd run`` against a sink that answers after 50 ms.

    python bench/latency.py [--latency 0.05] [--concurrency 256,1024] [--recipients N]
                            [--rounds R] [--batch-size B] [--pool-size P] [--sink-workers W]

The goal (project issue on performance): with a 50 ms sink, durable msgs/s >= 90% of
concurrency / latency at concurrency 256 (256 / 0.05 = 5,120, so >= 4,608), and the best
achievable at 1,024, with where the ceiling is and why.

The sink is nginx with the echo module (`echo_sleep`, a timer: one worker holds thousands of
waiting requests) on --sink-workers workers sharing the port, else aiohttp processes sleeping
in their handler. For each concurrency and round it measures, one after the other: the raw
blast (bench/_blast.py, no database), the same blast split over two processes started
together (the sink's ceiling above what one client process reaches), one `campaignd run`
as bench/throughput.py measures it, and two `campaignd run` processes started together, each
serving one of two senders with half the concurrency and half the messages (how a deployment
spreads senders over instances today; one sender is served by one process). Printed per
measurement: msgs/s, its share of the ideal C / latency, and the cores each party used,
which says who the ceiling is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    Daemon,
    Postgres,
    Sink,
    bench_workdir,
    clone_database,
    create_campaign,
    drop_database,
    embedded_postgres,
    int_list,
    quiet_moment,
    tree_cpu,
    wait_daemon_listening,
    write_daemon_config,
    zero_cost_sink,
)
from _payload import SENDER_ID
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.schema import migrate
from throughput import (
    POLL_SECONDS,
    TEMPLATE_DB,
    CampaignResult,
    RawResult,
    begin_run,
    measure_campaignd,
    measure_raw,
    per_message,
)

TARGET_SHARE = 0.9  # of concurrency / latency, at the target concurrency
TARGET_CONCURRENCY = 256


@dataclass
class SplitResult:
    """Two daemons, one sender each, started together."""

    rate: float
    elapsed: float
    daemon_cpu: float
    pg_cpu: float
    sent: int
    completed: int


@dataclass
class Point:
    concurrency: int
    raw: RawResult
    raw_split: RawResult
    campaignd: CampaignResult
    campaignd_split: SplitResult


SPLIT_SENDERS = (SENDER_ID, f"{SENDER_ID}2")


async def measure_campaignd_split(
    postgres: Postgres,
    sink: Sink,
    *,
    count: int,
    concurrency: int,
    batch_size: int,
    workdir: Path,
    name: str,
    time_limit: float,
    quiet_wait: float,
    pool_size: int | None,
) -> SplitResult:
    url = await clone_database(postgres, TEMPLATE_DB, name)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    daemons: list[Daemon] = []
    try:
        await migrate(connection)
        campaign_ids = [
            await create_campaign(connection, count // 2 + (1 if index < count % 2 else 0), sender_id=sender)
            for index, sender in enumerate(SPLIT_SENDERS)
        ]
        await connection.execute("ANALYZE campaignd.recipients")
        await connection.execute("CHECKPOINT")
        for index, sender in enumerate(SPLIT_SENDERS):
            config = write_daemon_config(
                workdir / f"{name}_{sender}.toml",
                database_url=url,
                sink_url=sink.url,
                concurrency=concurrency // 2,
                batch_size=batch_size,
                pool_size=pool_size,
                sender_id=sender,
            )
            daemons.append(Daemon(config, workdir / f"{name}_{sender}.log"))
            await wait_daemon_listening(connection, daemons[-1], listeners=index + 1)
        await quiet_moment(quiet_wait)
        pg_before = tree_cpu(postgres.pid)
        daemons_before = sum(daemon.cpu() for daemon in daemons)
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = ANY($1::uuid[])", campaign_ids
        )
        started = time.perf_counter()
        while True:
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'sending') AS sending,"
                " count(*) FILTER (WHERE status = 'completed') AS completed, sum(sent_count) AS sent"
                " FROM campaignd.campaigns WHERE id = ANY($1::uuid[])",
                campaign_ids,
            )
            assert row is not None
            if not row["sending"]:
                break
            for daemon in daemons:
                if not daemon.alive():
                    raise RuntimeError(f"campaignd exited during the run:\n{daemon.log_tail()}")
            if time.perf_counter() - started > time_limit:
                raise RuntimeError(f"campaigns not completed within {time_limit:.0f}s")
            await asyncio.sleep(POLL_SECONDS)
        elapsed = time.perf_counter() - started
        return SplitResult(
            rate=count / elapsed,
            elapsed=elapsed,
            daemon_cpu=sum(daemon.cpu() for daemon in daemons) - daemons_before,
            pg_cpu=tree_cpu(postgres.pid) - pg_before,
            sent=int(row["sent"]),
            completed=int(row["completed"]),
        )
    finally:
        for daemon in daemons:
            daemon.stop()
        await connection.close()
        await drop_database(postgres, name)


def share(rate: float, concurrency: int, latency: float) -> float:
    return rate * latency / concurrency


def cores(cpu_seconds: float, elapsed: float) -> float:
    return cpu_seconds / max(elapsed, 1e-9)


async def measure_point(
    postgres: Postgres, sink: Sink, args: argparse.Namespace, workdir: Path, concurrency: int, index: int
) -> Point:
    count = args.recipients
    # At least N x latency / C even at the ideal rate, plus start-up.
    time_limit = 60.0 + count / 500
    await quiet_moment(args.quiet_wait)
    raw = await measure_raw(sink, count, concurrency, time_limit)
    await quiet_moment(args.quiet_wait)
    raw_split = await measure_raw(sink, count, concurrency, time_limit, processes=2)
    run = await measure_campaignd(
        postgres,
        sink,
        count=count,
        concurrency=concurrency,
        batch_size=args.batch_size,
        workdir=workdir,
        name=f"bench_latency_{concurrency}_{index}",
        time_limit=time_limit,
        quiet_wait=args.quiet_wait,
        pool_size=args.pool_size,
    )
    split = await measure_campaignd_split(
        postgres,
        sink,
        count=count,
        concurrency=concurrency,
        batch_size=args.batch_size,
        workdir=workdir,
        name=f"bench_latency_split_{concurrency}_{index}",
        time_limit=time_limit,
        quiet_wait=args.quiet_wait,
        pool_size=args.pool_size,
    )
    ideal = concurrency / args.latency
    print(
        f"  [C={concurrency} round {index}] ideal {ideal:,.0f}; raw {raw.rate:,.0f} msg/s,"
        f" raw x2 processes {raw_split.rate:,.0f}, campaignd {run.rate:,.0f}"
        f" ({share(run.rate, concurrency, args.latency):.0%} of ideal),"
        f" campaignd x2 instances {split.rate:,.0f} ({share(split.rate, concurrency, args.latency):.0%})",
        flush=True,
    )
    return Point(concurrency, raw, raw_split, run, split)


def print_report(points: list[Point], args: argparse.Namespace) -> None:
    latency, count = args.latency, args.recipients
    print(
        f"\n{'C':>5} {'round':>5} {'ideal':>6} {'raw msg/s':>9} {'% ideal':>7} {'raw x2':>7} {'% ideal':>7}"
        f" {'campaignd':>9} {'% ideal':>7} {'cd/raw':>6} {'steady':>7} {'cd x2':>6} {'% ideal':>7}"
        f" {'cores: client raw/cd':>20} {'PG':>5} {'sink raw/cd':>11} {'other raw/cd':>12}"
        f" {'steal':>5} {'sink req/msg':>12} {'cores: cd x2/PG':>15}"
    )
    rounds: dict[int, int] = {}
    for point in points:
        c, raw, split, run = point.concurrency, point.raw, point.raw_split, point.campaignd
        cd_split = point.campaignd_split
        rounds[c] = rounds.get(c, 0) + 1
        print(
            f"{c:>5} {rounds[c]:>5} {c / latency:>6,.0f}"
            f" {raw.rate:>9,.0f} {share(raw.rate, c, latency):>7.0%}"
            f" {split.rate:>7,.0f} {share(split.rate, c, latency):>7.0%}"
            f" {run.rate:>9,.0f} {share(run.rate, c, latency):>7.0%} {run.rate / raw.rate:>6.2f}"
            f" {run.steady_rate:>7,.0f}"
            f" {cd_split.rate:>6,.0f} {share(cd_split.rate, c, latency):>7.0%}"
            f" {cores(raw.client_cpu, raw.elapsed):>10.2f}/{cores(run.daemon_cpu, run.elapsed):<9.2f}"
            f" {cores(run.pg_cpu, run.elapsed):>5.2f}"
            f" {cores(raw.sink_cpu, raw.elapsed):>5.2f}/{cores(run.sink_cpu, run.elapsed):<5.2f}"
            f" {raw.others_cores:>6.2f}/{run.others_cores:<5.2f} {run.steal_cores:>5.2f}"
            f" {per_message(run.sink_requests, count):>12}"
            f" {cores(cd_split.daemon_cpu, cd_split.elapsed):>9.2f}"
            f"/{cores(cd_split.pg_cpu, cd_split.elapsed):<5.2f}"
        )
        if run.daemon_events:
            logged = ", ".join(f"{event} x{n}" for event, n in sorted(run.daemon_events.items()))
            print(f"{'':>11} daemon warnings/errors: {logged}")
        split_incomplete = cd_split.sent != count or cd_split.completed != len(SPLIT_SENDERS)
        if raw.errors or split.errors or run.sent != count or run.status != "completed" or split_incomplete:
            print(
                f"{'':>11} problems: raw errors {raw.errors}, raw x2 errors {split.errors},"
                f" campaign {run.status} with {run.sent}/{count} sent,"
                f" x2 instances: {cd_split.completed} of 2 campaigns completed, {cd_split.sent}/{count} sent"
            )
        busiest = ", ".join(f"{key} {100 * part:.0f}%" for key, part in run.pg_activity)
        print(f"{'':>11} PG busiest statements: {busiest}")
    print()
    for concurrency in sorted(rounds):
        mine = [p for p in points if p.concurrency == concurrency]
        rates = [p.campaignd.rate for p in mine]
        raw_rates = [p.raw.rate for p in mine]
        split_rates = [p.raw_split.rate for p in mine]
        cd_split_rates = [p.campaignd_split.rate for p in mine]
        ideal = concurrency / latency
        median = statistics.median(rates)
        line = (
            f"C={concurrency}: campaignd median {median:,.0f} msg/s"
            f" (range {min(rates):,.0f}-{max(rates):,.0f}) = {share(median, concurrency, latency):.0%}"
            f" of {ideal:,.0f}; raw median {statistics.median(raw_rates):,.0f}"
            f" (range {min(raw_rates):,.0f}-{max(raw_rates):,.0f}), raw x2 processes median"
            f" {statistics.median(split_rates):,.0f}; campaignd x2 instances median"
            f" {statistics.median(cd_split_rates):,.0f}"
            f" ({share(statistics.median(cd_split_rates), concurrency, latency):.0%})"
        )
        if concurrency == TARGET_CONCURRENCY:
            target = TARGET_SHARE * ideal
            verdict = "MET" if median >= target else "NOT MET"
            line += f"; target >= {target:,.0f} -> {verdict}"
        print(line)


def describe(args: argparse.Namespace) -> None:
    print(
        f"  workload      N={args.recipients} per measurement, C in {args.concurrency}, rounds={args.rounds},"
        f" latency {args.latency * 1000:g} ms"
    )
    pool = "default (10)" if args.pool_size is None else str(args.pool_size)
    print(
        f"  campaignd     [dispatch] concurrency = C, batch_size = {args.batch_size}; [database] pool_size ="
        f" {pool}; rate 1,000,000/s burst 100,000, log warning"
    )
    print("  cores         CPU seconds / elapsed seconds of each party during the measurement")


async def main_async(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    await begin_run("campaignd latency-bound benchmark", postgres, sink)
    describe(args)
    print(flush=True)
    points = []
    for index in range(1, args.rounds + 1):
        for concurrency in args.concurrency:
            points.append(await measure_point(postgres, sink, args, workdir, concurrency, index))
    print_report(points, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (1 min)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--latency", type=float, default=0.05, help="seconds the sink waits per answer (0.05)"
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=[256, 1024],
        help="comma-separated concurrencies (256,1024)",
    )
    parser.add_argument("--recipients", type=int, default=20_000, help="messages per measurement (20000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all concurrencies (2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="campaignd [dispatch] batch_size (1000)")
    parser.add_argument("--pool-size", type=int, help="campaignd [database] pool_size (the default, 10)")
    parser.add_argument("--sink-workers", type=int, default=2, help="nginx workers sharing the port (2)")
    parser.add_argument("--sink", choices=["auto", "nginx", "aiohttp"], default="auto")
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="wait up to S s for an idle machine before each (10)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    args = parser.parse_args()
    with (
        bench_workdir("campaignd-latency-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
        zero_cost_sink(workdir / "sink", args.sink, latency=args.latency, workers=args.sink_workers) as sink,
    ):
        asyncio.run(main_async(args, postgres, sink, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
