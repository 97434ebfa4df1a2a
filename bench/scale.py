"""Scale: flat cost through a campaign, beside older campaigns' rows, and the daemon's memory.

    python bench/scale.py [--recipients 200000] [--old-rows 1000000,10000000]
                          [--rss-sizes 10000,100000,1000000] [--rounds 1]

Targets (the performance issue):
1. flat cost: msgs/s over the first 10% of a campaign's sends equals msgs/s over the last 10%;
2. the same campaign runs as fast when the recipients table already holds 1M or 10M rows of
   older, completed campaigns as when it holds none;
3. the RSS of the ``campaignd run`` process stays <= 100 MB, flat, for campaigns of 10k, 100k
   and 1M recipients.

Setup: embedded PostgreSQL at default durability, nginx answering 200 on loopback (the
throughput benchmark's zero-cost sink; an aiohttp sink without nginx, named in the output),
one daemon with concurrency 64, batch_size 1000 and the sender's rate out of the way.
Campaigns are loaded with COPY, as a host would; older campaigns' rows are written with
``INSERT … SELECT generate_series`` (state 'sent', one completed campaign per 100,000 rows),
then VACUUM ANALYZE, as autovacuum would have left them.

Decile rates come from the recipients' ``sent_at`` (the time the daemon's outcome batch was
written): 10% of N / (time of the 10%-th send - time of the first), and likewise for the
last 10%. RSS is VmRSS read from /proc/<pid>/status every 0.5 s (max and last) and VmHWM
(the kernel's peak) just before SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from _common import (
    Daemon,
    Postgres,
    Sink,
    bench_workdir,
    clone_database,
    create_campaign,
    create_template,
    drop_database,
    embedded_postgres,
    quiet_moment,
    refresh_settings,
    register_sender,
    wait_daemon_listening,
    write_daemon_config,
    zero_cost_sink,
)
from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.logs import configure_logging

TEMPLATE_DB = "bench_scale_template"
OLD_CAMPAIGN_SIZE = 100_000
RSS_TARGET_MB = 100.0
FLAT_TOLERANCE = 0.10


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def add_old_rows(url: str, rows: int) -> float:
    """Completed campaigns totalling ``rows`` sent recipients; returns the seconds it took."""
    started = time.perf_counter()
    connection = await asyncpg.connect(url)
    try:
        # Fixture data in the benchmark's own superuser session: skipping the per-row foreign-key
        # triggers makes 10M rows minutes faster, and the rows are valid by construction.
        await connection.execute("SET session_replication_role = replica")
        await register_sender(connection)
        campaigns = -(-rows // OLD_CAMPAIGN_SIZE)
        for index in range(campaigns):
            size = min(OLD_CAMPAIGN_SIZE, rows - index * OLD_CAMPAIGN_SIZE)
            async with connection.transaction():
                campaign_id = await connection.fetchval(
                    "INSERT INTO campaignd.campaigns (name, sender_id, message, status, total_count,"
                    " sent_count, prepared_at, started_at, completed_at)"
                    " VALUES ($1, 'bench', '{\"text\": \"old\"}', 'completed', $2, $2, now(), now(), now())"
                    " RETURNING id",
                    f"old {index}",
                    size,
                )
                await connection.execute(
                    "INSERT INTO campaignd.recipients (campaign_id, address, variables, state, attempts,"
                    " provider_message_id, sent_at)"
                    " SELECT $1, '+1777' || lpad(g::text, 8, '0'), jsonb_build_object('name', 'n' || g),"
                    " 'sent', 1, 'x', now() FROM generate_series(1, $2) AS g",
                    campaign_id,
                    size,
                )
        await connection.execute("VACUUM (ANALYZE) campaignd.recipients")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()
    return time.perf_counter() - started


@dataclass
class Run:
    label: str
    recipients: int
    old_rows: int
    elapsed: float
    rate: float
    first_decile: float
    last_decile: float
    rss_max_mb: float
    rss_last_mb: float
    hwm_mb: float


async def run_campaign(
    postgres: Postgres, sink: Sink, workdir: Path, label: str, recipients: int, old_rows: int
) -> Run:
    name = f"bench_scale_{label}".replace("-", "_")
    url = await clone_database(postgres, TEMPLATE_DB, name)
    try:
        if old_rows:
            seconds = await add_old_rows(url, old_rows)
            print(f"    [{label}] {old_rows:,} older rows written in {seconds:.0f} s", flush=True)
        connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
        # The daemon's session settings force custom plans, which re-plans the COPY's foreign-key
        # check per row (see sql/bulkload.sql); the load is not what is measured here.
        await connection.execute("SET plan_cache_mode = auto")
        config = write_daemon_config(
            workdir / f"{name}.toml", database_url=url, sink_url=sink.url, concurrency=64, batch_size=1000
        )
        campaign_id = await create_campaign(connection, recipients)
        await connection.execute("ANALYZE campaignd.recipients")
        await connection.execute("CHECKPOINT")
        daemon = Daemon(config, workdir / f"{name}.log")
        try:
            await wait_daemon_listening(connection, daemon)
            await quiet_moment(5.0)
            started = time.monotonic()
            await connection.execute(
                "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id
            )
            rss_max = rss_last = 0
            deadline = started + 120 + recipients / 500
            status = "sending"
            while status == "sending" and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                rss_last = proc_status_kib(daemon.pid, "VmRSS")
                rss_max = max(rss_max, rss_last)
                status = await connection.fetchval(
                    "SELECT status FROM campaignd.campaigns WHERE id = $1", campaign_id
                )
                if not daemon.alive():
                    raise RuntimeError(f"campaignd exited:\n{daemon.log_tail()}")
            elapsed = time.monotonic() - started
            hwm = proc_status_kib(daemon.pid, "VmHWM")
        finally:
            daemon.stop()
        if status != "completed":
            raise RuntimeError(f"campaign {status} after {elapsed:.0f} s:\n{daemon.log_tail()}")
        first, last = await decile_rates(connection, campaign_id, recipients)
        await connection.close()
    finally:
        await drop_database(postgres, name)
    return Run(
        label, recipients, old_rows, elapsed, recipients / elapsed, first, last,
        rss_max / 1024, rss_last / 1024, hwm / 1024,
    )  # fmt: skip


async def decile_rates(
    connection: asyncpg.Connection, campaign_id: str, recipients: int
) -> tuple[float, float]:
    row = await connection.fetchrow(
        "SELECT percentile_disc(ARRAY[0, 0.1, 0.9, 1]::float8[]) WITHIN GROUP"
        " (ORDER BY extract(epoch FROM sent_at)) AS t"
        " FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'sent'",
        campaign_id,
    )
    assert row is not None
    t0, t10, t90, t100 = (float(x) for x in row["t"])
    tenth = recipients / 10
    return tenth / max(1e-9, t10 - t0), tenth / max(1e-9, t100 - t90)


def report(run: Run) -> None:
    ratio = run.last_decile / run.first_decile
    print(
        f"  {run.label:>14}: {run.recipients:>9,} recipients, {run.old_rows:>10,} older rows:"
        f" {run.rate:>7,.0f} msg/s overall ({run.elapsed:.1f} s); first 10% {run.first_decile:,.0f}/s,"
        f" last 10% {run.last_decile:,.0f}/s (last/first {ratio:.2f});"
        f" RSS max {run.rss_max_mb:.1f} MB, at end {run.rss_last_mb:.1f} MB, VmHWM {run.hwm_mb:.1f} MB",
        flush=True,
    )


async def main_async(args: argparse.Namespace, postgres: Postgres, sink: Sink, workdir: Path) -> None:
    configure_logging("console", "warning")
    await refresh_settings(postgres)
    await create_template(postgres, TEMPLATE_DB)
    settings = ", ".join(f"{k}={postgres.durability[k]}" for k in ("fsync", "synchronous_commit"))
    print(f"PostgreSQL {postgres.version} ({settings}); sink: {sink.kind}; {os.cpu_count()} CPUs", flush=True)
    old_sizes = [int(n) for n in args.old_rows.split(",") if n]
    rss_sizes = [int(n) for n in args.rss_sizes.split(",") if n]
    runs: list[Run] = []
    for round_index in range(1, args.rounds + 1):
        print(f"round {round_index}: flat cost and older rows", flush=True)
        for old in [0, *old_sizes]:
            runs.append(await run_campaign(postgres, sink, workdir, f"old-{old}", args.recipients, old))
            report(runs[-1])
        print(f"round {round_index}: RSS by campaign size", flush=True)
        for size in rss_sizes:
            runs.append(await run_campaign(postgres, sink, workdir, f"rss-{size}", size, 0))
            report(runs[-1])
    flat = [r for r in runs if r.label.startswith("old-")]
    ratios = [r.last_decile / r.first_decile for r in flat]
    print(
        f"\nflat cost: last/first decile ratios {min(ratios):.2f}-{max(ratios):.2f}"
        f" (target 1.00 ± {FLAT_TOLERANCE:.2f})"
    )
    for old in old_sizes:
        base = [r.rate for r in flat if r.old_rows == 0]
        with_old = [r.rate for r in flat if r.old_rows == old]
        print(
            f"older rows {old:,}: {min(with_old):,.0f}-{max(with_old):,.0f} msg/s vs none:"
            f" {min(base):,.0f}-{max(base):,.0f} msg/s"
        )
    peak = max(r.hwm_mb for r in runs)
    print(f"RSS: peak VmHWM {peak:.1f} MB over all runs (target <= {RSS_TARGET_MB:.0f} MB, flat)")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=200_000, help="flat-cost campaign size (200000)")
    parser.add_argument(
        "--old-rows",
        default="1000000,10000000",
        help="older rows per pass, comma-separated (1000000,10000000)",
    )
    parser.add_argument(
        "--rss-sizes", default="10000,100000,1000000", help="campaign sizes for RSS (10000,100000,1000000)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything (1)")
    parser.add_argument("--sink", choices=["auto", "nginx", "aiohttp"], default="auto")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    args = parser.parse_args()
    with (
        bench_workdir("campaignd-bench-scale-", keep=args.keep_workdir) as workdir,
        embedded_postgres(workdir) as postgres,
        zero_cost_sink(workdir / "sink", args.sink) as sink,
    ):
        asyncio.run(main_async(args, postgres, sink, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
