"""One general-purpose Postgres job queue doing campaignd's job: one job per message, the job
POSTs the message to the sink. Run by bench/queues.py, in the benchmark's own environment
(pgqueuer and procrastinate are not campaignd dependencies; see bench/README.md).

Protocol with the driver, so that its clock covers processing only, as it does for campaignd:
install the queue's schema in the (fresh) database, enqueue N jobs in bulk, print one JSON line
with the enqueue time, wait for a line on stdin, process every job with C concurrent jobs,
print one JSON line with the processing time and counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson
import uvloop

from _payload import message
from _poster import Poster

ENTRYPOINT = "send"


# ------------------------------------------------------------------ pgqueuer


async def run_pgqueuer(args: argparse.Namespace, poster: Poster, go: Callable[[], Awaitable[None]]) -> float:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    connection = await asyncpg.connect(args.dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        # The payload is the body itself: pgqueuer's natural use, and no rendering in the job.
        payloads: list[bytes | None] = [orjson.dumps(message(i, args.campaign_id)) for i in range(args.count)]
        started = time.perf_counter()
        await queries.enqueue([ENTRYPOINT] * args.count, payloads, [0] * args.count)
        report({"enqueue_seconds": time.perf_counter() - started})
        await go()

        manager = QueueManager(queries)

        @manager.entrypoint(ENTRYPOINT)
        async def send(job: Job) -> None:
            assert job.payload is not None
            await poster.post(job.payload, f"{args.campaign_id}:{job.id}")

        started = time.perf_counter()
        # max_concurrent_tasks caps this worker's picked jobs (pgqueuer wants it at least twice
        # the dequeue batch); drain mode returns once the queue is empty and the jobs' outcomes
        # are flushed to pgqueuer_log, which is "all done".
        await manager.run(
            batch_size=args.concurrency // 2,
            max_concurrent_tasks=args.concurrency,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=1),
        )
        elapsed = time.perf_counter() - started
        left = await connection.fetchval("SELECT count(*) FROM pgqueuer")
        if left:
            raise RuntimeError(f"pgqueuer stopped with {left} jobs still queued")
        return elapsed
    finally:
        await connection.close()


# ------------------------------------------------------------------ procrastinate


async def run_procrastinate(
    args: argparse.Namespace, poster: Poster, go: Callable[[], Awaitable[None]]
) -> float:
    import procrastinate

    # A pool (procrastinate takes a connection per fetch and per outcome) of campaignd's default
    # size and then some; more connections do not make 2 cores faster.
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=args.dsn, min_size=4, max_size=20)
    )

    @app.task(name=ENTRYPOINT)
    async def send(to: str, message: dict[str, str], campaign_id: str, recipient_id: int) -> None:
        body = orjson.dumps(
            {"to": to, "message": message, "campaign_id": campaign_id, "recipient_id": recipient_id}
        )
        await poster.post(body, f"{campaign_id}:{recipient_id}")

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        jobs = [message(i, args.campaign_id) for i in range(args.count)]
        started = time.perf_counter()
        await send.batch_defer_async(*jobs)
        report({"enqueue_seconds": time.perf_counter() - started})
        await go()

        started = time.perf_counter()
        # wait=False: the worker returns once it has caught up with the queue. Jobs are kept
        # as 'succeeded' rows (delete_jobs="never", the default), an UPDATE per job.
        await app.run_worker_async(concurrency=args.concurrency, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        async with app.connector.pool.connection() as connection:  # type: ignore[attr-defined]
            cursor = await connection.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
            )
            row = await cursor.fetchone()
        if row and row[0]:
            raise RuntimeError(f"procrastinate stopped with {row[0]} jobs not succeeded")
        return elapsed


# ------------------------------------------------------------------ main

SYSTEMS: dict[
    str, Callable[[argparse.Namespace, Poster, Callable[[], Awaitable[None]]], Awaitable[float]]
] = {
    "pgqueuer": run_pgqueuer,
    "procrastinate": run_procrastinate,
}


def report(fields: dict[str, Any]) -> None:
    print(json.dumps(fields), flush=True)


def process_cpu_self() -> float:
    times = os.times()
    return times.user + times.system


async def main_async(args: argparse.Namespace) -> None:
    poster = Poster(args.url, args.concurrency)
    cpu: list[float] = []

    async def go() -> None:
        # The driver starts its clocks and CPU readings, then says go.
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            raise RuntimeError("the driver went away before saying go")
        cpu.append(process_cpu_self())

    try:
        elapsed = await SYSTEMS[args.system](args, poster, go)
    finally:
        await poster.close()
    report(
        {
            "elapsed": elapsed,
            "ok": poster.ok,
            "errors": poster.errors,
            "cpu_seconds": process_cpu_self() - cpu[0],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--campaign-id", required=True)
    args = parser.parse_args()
    # On uvloop, like `campaignd run` and the raw blast.
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
