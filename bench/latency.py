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
together (the sink's ceiling above what one client process reaches), and one `campaignd run`
as bench/throughput.py measures it. Printed per measurement: msgs/s, its share of the ideal
C / latency, and the cores each party used, which says who the ceiling is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from _common import (
    Postgres,
    Sink,
    bench_workdir,
    embedded_postgres,
    quiet_moment,
    zero_cost_sink,
)
from throughput import (
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
class Point:
    concurrency: int
    raw: RawResult
    raw_split: RawResult
    campaignd: CampaignResult


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
    ideal = concurrency / args.latency
    print(
        f"  [C={concurrency} round {index}] ideal {ideal:,.0f}; raw {raw.rate:,.0f} msg/s,"
        f" raw x2 processes {raw_split.rate:,.0f}, campaignd {run.rate:,.0f}"
        f" ({share(run.rate, concurrency, args.latency):.0%} of ideal)",
        flush=True,
    )
    return Point(concurrency, raw, raw_split, run)


def print_report(points: list[Point], args: argparse.Namespace) -> None:
    latency, count = args.latency, args.recipients
    print(
        f"\n{'C':>5} {'round':>5} {'ideal':>6} {'raw msg/s':>9} {'% ideal':>7} {'raw x2':>7} {'% ideal':>7}"
        f" {'campaignd':>9} {'% ideal':>7} {'cd/raw':>6} {'steady':>7}"
        f" {'cores: client raw/cd':>20} {'PG':>5} {'sink raw/cd':>11} {'other raw/cd':>12}"
        f" {'steal':>5} {'sink req/msg':>12}"
    )
    rounds: dict[int, int] = {}
    for point in points:
        c, raw, split, run = point.concurrency, point.raw, point.raw_split, point.campaignd
        rounds[c] = rounds.get(c, 0) + 1
        print(
            f"{c:>5} {rounds[c]:>5} {c / latency:>6,.0f}"
            f" {raw.rate:>9,.0f} {share(raw.rate, c, latency):>7.0%}"
            f" {split.rate:>7,.0f} {share(split.rate, c, latency):>7.0%}"
            f" {run.rate:>9,.0f} {share(run.rate, c, latency):>7.0%} {run.rate / raw.rate:>6.2f}"
            f" {run.steady_rate:>7,.0f}"
            f" {cores(raw.client_cpu, raw.elapsed):>10.2f}/{cores(run.daemon_cpu, run.elapsed):<9.2f}"
            f" {cores(run.pg_cpu, run.elapsed):>5.2f}"
            f" {cores(raw.sink_cpu, raw.elapsed):>5.2f}/{cores(run.sink_cpu, run.elapsed):<5.2f}"
            f" {raw.others_cores:>6.2f}/{run.others_cores:<5.2f} {run.steal_cores:>5.2f}"
            f" {per_message(run.sink_requests, count):>12}"
        )
        if run.daemon_events:
            logged = ", ".join(f"{event} x{n}" for event, n in sorted(run.daemon_events.items()))
            print(f"{'':>11} daemon warnings/errors: {logged}")
        if raw.errors or split.errors or run.sent != count or run.status != "completed":
            print(
                f"{'':>11} problems: raw errors {raw.errors}, raw x2 errors {split.errors},"
                f" campaign {run.status} with {run.sent}/{count} sent"
            )
        busiest = ", ".join(f"{key} {100 * part:.0f}%" for key, part in run.pg_activity)
        print(f"{'':>11} PG busiest statements: {busiest}")
    print()
    for concurrency in sorted(rounds):
        mine = [p for p in points if p.concurrency == concurrency]
        rates = [p.campaignd.rate for p in mine]
        raw_rates = [p.raw.rate for p in mine]
        split_rates = [p.raw_split.rate for p in mine]
        ideal = concurrency / latency
        median = statistics.median(rates)
        line = (
            f"C={concurrency}: campaignd median {median:,.0f} msg/s"
            f" (range {min(rates):,.0f}-{max(rates):,.0f}) = {share(median, concurrency, latency):.0%}"
            f" of {ideal:,.0f}; raw median {statistics.median(raw_rates):,.0f}"
            f" (range {min(raw_rates):,.0f}-{max(raw_rates):,.0f}), raw x2 processes median"
            f" {statistics.median(split_rates):,.0f}"
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
        type=lambda text: [int(part) for part in text.split(",")],
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
