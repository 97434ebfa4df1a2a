"""``campaignd demo``: the whole daemon, end to end, on a laptop, in under a minute.

Embedded PostgreSQL + a local fake provider + a campaign with a few bad recipients and
some provider errors, sent by the real daemon code, with a live progress display.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from campaignd import db
from campaignd.config import Settings
from campaignd.daemon import Daemon, DaemonFailed, shutdown_on_signals, sync_senders
from campaignd.dispatch import Shutdown
from campaignd.embedded import EmbeddedUnavailable, start_embedded
from campaignd.fakeprovider import Behaviour, FakeProvider, Rule
from campaignd.logs import configure_logging
from campaignd.schema import migrate
from campaignd.sql import QUERIES

SENDER_ID = "demo-sms"
MESSAGE = {"text": "Hi {{first_name}}, your code is {{code}}. Reply STOP to opt out."}
DEMO_TIMEOUT_SECONDS = 240


def _recipients(count: int) -> tuple[list[tuple[str | None, dict[str, Any]]], dict[str, Rule]]:
    """A campaign list with the mistakes real lists have, and the provider's reactions."""
    rng = random.Random(7)
    rows: list[tuple[str | None, dict[str, Any]]] = []
    for index in range(count):
        rows.append(
            (f"+1555{index:07d}", {"first_name": f"Customer{index}", "code": rng.randint(1000, 9999)})
        )
    # No address, a duplicate, a missing variable, an address with a space: skipped with a reason.
    rows[10] = (None, rows[10][1])
    rows[11] = ("", rows[11][1])
    rows[20] = (rows[19][0], rows[20][1])
    rows[30] = (rows[30][0], {"first_name": "NoCode"})
    rows[40] = ("+1 555 bad", rows[40][1])
    rules = {
        # Permanently unreachable numbers: failed with the provider's code.
        f"+1555{i:07d}": Rule(400, {"error": {"code": "unreachable", "message": "number not on network"}})
        for i in range(100, count, 500)
    }
    # A couple of flaky numbers that succeed on retry.
    for i in range(150, count, 700):
        rules[f"+1555{i:07d}"] = Rule(500, {"error": {"code": "upstream_error"}}, times=1)
    return rows, rules


async def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    configure_logging("console", "warning")
    data_dir: Path = args.data_dir or Path(tempfile.mkdtemp(prefix="campaignd-demo-")) / "pgdata"
    console.print(f"[bold]campaignd demo[/] - embedded PostgreSQL in [cyan]{data_dir}[/]")
    try:
        url, _server = await asyncio.to_thread(start_embedded, data_dir)
    except EmbeddedUnavailable as exc:
        # Text, not markup: the install hint's "campaignd[embedded]" read as a markup tag was
        # printed as "campaignd", which installs no PostgreSQL.
        console.print(Text(str(exc), style="red"))
        return 1

    rows, rules = _recipients(args.recipients)
    provider = FakeProvider(Behaviour(latency_seconds=0.01, jitter_seconds=0.02, rules=rules, seed=1))
    provider.behaviour.throttle_rate = 0.002
    await provider.start()
    settings = Settings.model_validate(
        {
            "database": {"url": url, "pool_size": 8},
            "dispatch": {
                "concurrency": 64,
                "batch_size": 200,
                "backoff_base_seconds": 0.5,
                "backoff_max_seconds": 2.0,
                "poll_seconds": 0.5,
            },
            "log": {"format": "console", "level": "warning"},
            # An ephemeral port: the demo must not collide with a daemon running on this host.
            "health": {"listen": "127.0.0.1:0"},
            "senders": {SENDER_ID: {"url": provider.url, "rate_per_second": args.rate, "burst": 20}},
        }
    )
    console.print(f"fake provider at [cyan]{provider.url}[/], sender rate limit {args.rate:g} msg/s")
    try:
        return await _run(console, settings, url, rows, provider)
    finally:
        await provider.stop()


async def _run(
    console: Console,
    settings: Settings,
    url: str,
    rows: list[tuple[str | None, dict[str, Any]]],
    provider: FakeProvider,
) -> int:
    connection = await db.connect(settings.database)
    try:
        await migrate(connection)
        await sync_senders(connection, settings)
        campaign_id = await _create_campaign(connection, rows)
        console.print(f"campaign [cyan]{campaign_id}[/]: {len(rows)} recipients, set to SENDING")

        shutdown = Shutdown(settings.dispatch.drain_seconds)
        daemon = Daemon(settings, shutdown)
        started = time.monotonic()
        with shutdown_on_signals(shutdown):
            daemon_task = asyncio.create_task(daemon.run())
            status = await _watch(console, connection, campaign_id, len(rows), daemon_task)
            shutdown.request()
            try:
                await daemon_task
            except DaemonFailed as exc:
                # Logged as daemon_failed with its traceback; what was sent is still worth showing.
                console.print(Text(f"the daemon failed ({exc}) after draining its lanes", style="red"))
                status = "daemon failed"
        elapsed = time.monotonic() - started
        await _summary(console, connection, campaign_id, provider, elapsed)
        return 0 if status == "completed" else 1
    finally:
        await connection.close()


async def _create_campaign(
    connection: asyncpg.Connection, rows: list[tuple[str | None, dict[str, Any]]]
) -> str:
    async with connection.transaction():
        campaign_id = await connection.fetchval(
            "INSERT INTO campaignd.campaigns (name, sender_id, message) VALUES ($1, $2, $3) RETURNING id",
            "demo: spring sale",
            SENDER_ID,
            MESSAGE,
        )
        await connection.copy_records_to_table(
            "recipients",
            schema_name="campaignd",
            columns=["campaign_id", "address", "variables"],
            records=[(campaign_id, address, variables) for address, variables in rows],
        )
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id
        )
    return str(campaign_id)


async def _watch(
    console: Console,
    connection: asyncpg.Connection,
    campaign_id: str,
    total: int,
    daemon_task: asyncio.Task[None],
) -> str:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}  failed {task.fields[failed]}  skipped {task.fields[skipped]}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("sending", total=total, sent=0, failed=0, skipped=0)
        while True:
            row = await connection.fetchrow(QUERIES["campaign_status_one"], campaign_id)
            assert row is not None
            done = row["sent_count"] + row["failed_count"] + row["skipped_count"]
            progress.update(
                bar,
                completed=done,
                sent=row["sent_count"],
                failed=row["failed_count"],
                skipped=row["skipped_count"],
                description=row["status"],
            )
            if row["status"] not in ("sending", "draft"):
                return str(row["status"])
            if daemon_task.done() or time.monotonic() > deadline:
                return str(row["status"])
            await asyncio.sleep(0.2)


async def _summary(
    console: Console, connection: asyncpg.Connection, campaign_id: str, provider: FakeProvider, elapsed: float
) -> None:
    row = await connection.fetchrow(QUERIES["campaign_status_one"], campaign_id)
    assert row is not None
    errors = await connection.fetch(QUERIES["campaign_error_counts"], campaign_id)
    table = Table(title=f"campaign {campaign_id}: {row['status']}")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_row("recipients", str(row["total_count"]))
    table.add_row("sent", str(row["sent_count"]))
    table.add_row("failed", str(row["failed_count"]))
    table.add_row("skipped", str(row["skipped_count"]))
    for error in errors:
        table.add_row(f"  {error['state']}: {error['error_code']}", str(error["n"]))
    table.add_row("provider requests (incl. retries)", str(provider.request_count()))
    table.add_row("provider accepted (distinct keys)", str(provider.accepted_count()))
    table.add_row("delivered twice", str(len(provider.addresses_delivered_under_several_keys())))
    console.print(table)
    rate = row["sent_count"] / elapsed if elapsed else 0.0
    console.print(
        f"done in {elapsed:.1f} s ({rate:.0f} msg/s sent). "
        f"Counters match the recipients table: "
        f"{await _counters_match(connection, campaign_id)}"
    )


async def _counters_match(connection: asyncpg.Connection, campaign_id: str) -> bool:
    counts = {
        r["state"]: r["n"] for r in await connection.fetch(QUERIES["campaign_state_counts"], campaign_id)
    }
    row = await connection.fetchrow(QUERIES["campaign_status_one"], campaign_id)
    assert row is not None
    return bool(
        counts.get("sent", 0) == row["sent_count"]
        and counts.get("failed", 0) == row["failed_count"]
        and counts.get("skipped", 0) == row["skipped_count"]
        and sum(counts.values()) == row["total_count"]
    )
