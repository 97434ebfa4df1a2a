"""Rate accuracy: a sender at 200 msg/s, burst 20, measured at the provider.

    python bench/rate_accuracy.py [--rate 200] [--burst 20] [--seconds 30] [--instances 1,3]

Target (the performance issue): over 30 s, the achieved rate is within 2% of 200 msg/s, and
no 1-second window at the provider holds more than rate + burst = 220 requests; the same
with three ``campaignd run`` instances against the same database and sender (one holds the
sender's lane; the others must neither add requests nor break the limit).

The provider is the fake provider in a process of its own (``python -m campaignd.fakeprovider``,
at a raised scheduling priority when allowed), which time-stamps each request on arrival
with time.monotonic(); its records are read at GET /_fake/records. Each pass uses a fresh
database and provider, and a campaign of rate x seconds recipients, so the campaign lasts
the measurement. Embedded PostgreSQL at default durability.

Figures per pass:
- achieved: (requests - 1) / (last - first arrival): the whole campaign, burst included;
- steady: the same after the first 2 s (the burst spent), the bucket's own accuracy;
- max 1 s: the most requests in any half-open 1-second window (campaignd.fakeprovider.max_in_window);
- duplicates: requests whose Idempotency-Key had already been accepted (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    Daemon,
    bench_workdir,
    clone_database,
    create_campaign,
    create_template,
    embedded_postgres,
    refresh_settings,
    stop_process,
    wait_daemon_listening,
    write_daemon_config,
)
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import RECORDS_PATH, max_in_window
from campaignd.logs import configure_logging

TEMPLATE_DB = "bench_rate_template"
TOLERANCE = 0.02
STEADY_AFTER_SECONDS = 2.0


def _raise_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(-10)


@contextlib.contextmanager
def provider_process() -> Iterator[str]:
    """The fake provider in its own process, at a higher priority than the daemons when allowed:
    a provider starved of CPU stamps arrivals late and in clumps, which is the machine's noise."""
    process = subprocess.Popen(
        [sys.executable, "-m", "campaignd.fakeprovider"], stdout=subprocess.PIPE, preexec_fn=_raise_priority
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().decode().strip()
        if not url.startswith("http://"):
            raise RuntimeError("the fake provider did not start")
        yield url
    finally:
        stop_process(process, timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def provider_records(url: str) -> dict[str, Any]:
    base = url.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + RECORDS_PATH, timeout=30) as response:
        records: dict[str, Any] = json.loads(response.read())
    return records


@dataclass
class Pass:
    instances: int
    requests: int
    accepted: int
    duplicates: int
    achieved: float
    steady: float
    max_window: int
    elapsed: float


async def run_pass(postgres: Any, workdir: Path, args: argparse.Namespace, instances: int) -> Pass:
    recipients = int(args.rate * args.seconds)
    name = f"bench_rate_{instances}"
    url = await clone_database(postgres, TEMPLATE_DB, name)
    with provider_process() as provider_url:
        config = write_daemon_config(
            workdir / f"rate-{instances}.toml",
            database_url=url,
            sink_url=provider_url,
            concurrency=64,
            batch_size=args.batch_size,
            rate_per_second=args.rate,
            burst=args.burst,
        )
        connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
        daemons = [Daemon(config, workdir / f"rate-{instances}-{i}.log") for i in range(instances)]
        try:
            for daemon in daemons:
                await wait_daemon_listening(connection, daemon)
            campaign_id = await create_campaign(connection, recipients)
            started = time.monotonic()
            await connection.execute(
                "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id
            )
            deadline = started + args.seconds * 3 + 60
            while time.monotonic() < deadline:
                status = await connection.fetchval(
                    "SELECT status FROM campaignd.campaigns WHERE id = $1", campaign_id
                )
                if status != "sending":
                    break
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            if status != "completed":
                raise RuntimeError(f"campaign ended {status} after {elapsed:.1f} s")
            records = provider_records(provider_url)
        finally:
            for daemon in daemons:
                daemon.stop()
            await connection.close()
    times = sorted(records["request_times"])
    first = times[0]
    steady = [t for t in times if t - first >= STEADY_AFTER_SECONDS]
    return Pass(
        instances=instances,
        requests=len(times),
        accepted=len(records["accepted"]),
        duplicates=sum(records["duplicates"].values()),
        achieved=(len(times) - 1) / (times[-1] - first),
        steady=(len(steady) - 1) / (steady[-1] - steady[0]),
        max_window=max_in_window(times, 1.0),
        elapsed=elapsed,
    )


def verdict(result: Pass, rate: float, burst: int) -> str:
    within = abs(result.steady - rate) <= TOLERANCE * rate and abs(result.achieved - rate) <= TOLERANCE * rate
    bounded = result.max_window <= rate + burst
    return "MET" if within and bounded and result.duplicates == 0 else "NOT MET"


async def main_async(args: argparse.Namespace, workdir: Path) -> int:
    configure_logging("console", "warning")
    counts = [int(n) for n in args.instances.split(",")]
    with embedded_postgres(workdir) as postgres:
        await refresh_settings(postgres)
        await create_template(postgres, TEMPLATE_DB)
        print(
            f"sender {args.rate:g}/s burst {args.burst}, campaign of {int(args.rate * args.seconds):,}"
            f" recipients (~{args.seconds:g} s), batch_size {args.batch_size};"
            f" PostgreSQL {postgres.version}, fsync="
            f"{postgres.durability['fsync']}; {os.cpu_count()} CPUs",
            flush=True,
        )
        results = []
        for round_index in range(1, args.rounds + 1):
            for instances in counts:
                result = await run_pass(postgres, workdir, args, instances)
                results.append(result)
                print(
                    f"  round {round_index}, {instances} instance(s): {result.requests:,} requests"
                    f" ({result.accepted:,} accepted, {result.duplicates} duplicates)"
                    f" in {result.elapsed:.1f} s;"
                    f" achieved {result.achieved:.2f}/s, steady {result.steady:.2f}/s"
                    f" ({(result.steady / args.rate - 1) * 100:+.2f}%), max in 1 s {result.max_window}"
                    f" (limit {args.rate + args.burst:g}): {verdict(result, args.rate, args.burst)}",
                    flush=True,
                )
    print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    return 0 if all(verdict(r, args.rate, args.burst) == "MET" for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="sender rate_per_second (200)")
    parser.add_argument("--burst", type=int, default=20, help="sender burst (20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="campaign length at the rate (30)")
    parser.add_argument(
        "--instances", default="1,3", help="comma-separated daemon counts, one pass each (1,3)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every pass (1)")
    parser.add_argument(
        "--batch-size", type=int, default=500, help="[dispatch] batch_size (500, the daemon's default)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    args = parser.parse_args()
    with bench_workdir("campaignd-bench-rate-", keep=args.keep_workdir) as workdir:
        return asyncio.run(main_async(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
