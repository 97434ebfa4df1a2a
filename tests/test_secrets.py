"""A provider token never reaches the logs, the database or the metrics, even when the
provider echoes it back or an error message quotes a URL that carries it."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from campaignd.fakeprovider import FakeProvider, Rule
from tests.conftest import (
    bug_planted,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_status,
)

HEADER_TOKEN = "hdr-S3CRET-7f1c2d9e4b"
QUERY_TOKEN = "qry-S3CRET-0a9b8c7d6e"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_tokens_never_reach_logs_database_or_metrics(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The provider echoes the credential it was given, with and without its scheme.
    fake.behaviour.rules["+15550000001"] = Rule(
        400,
        {"error": {"code": HEADER_TOKEN, "message": f"token Bearer {HEADER_TOKEN} / {HEADER_TOKEN} refused"}},
    )
    fake.behaviour.rules["+15550000002"] = Rule(
        401, {"error": {"code": "unauthorized", "message": f"invalid token {HEADER_TOKEN}"}}
    )
    health_port = closed_port()
    config = daemon_config(
        tmp_path,
        database_url,
        {
            "echo": {
                "url": fake.url + f"?access_token={QUERY_TOKEN}",
                "headers": {"Authorization": "env:ECHO_TOKEN"},
            },
            # Nothing listens there: the connection error quotes the URL, query string included.
            "down": {"url": f"http://127.0.0.1:{closed_port()}/send?access_token={QUERY_TOKEN}"},
        },
        health_listen=f"127.0.0.1:{health_port}",
        max_attempts=2,
    )
    echoed = await create_campaign(conn, "echo", [("+15550000001", {"name": "a"})], name="echo")
    unreachable = await create_campaign(conn, "down", [("+15550000009", {"name": "b"})], name="down")
    daemon = daemons(config, env={"ECHO_TOKEN": f"Bearer {HEADER_TOKEN}"})

    await wait_status(conn, echoed, "completed", timeout=60)
    await wait_status(conn, unreachable, "completed", timeout=60)
    assert fake.last_headers["Authorization"] == f"Bearer {HEADER_TOKEN}", "the token was really sent"

    # A sender-level rejection whose message echoes the token: the pause reason is clean.
    paused = await create_campaign(conn, "echo", [("+15550000002", {"name": "c"})], name="paused")
    await wait_status(conn, paused, "paused", timeout=60)

    async def metrics_text() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{health_port}/metrics") as response,
        ):
            return await response.text()

    metrics = await wait_for(metrics_text, timeout=30, what="metrics")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    stored = " ".join(
        str(value)
        for row in await conn.fetch(
            "SELECT error_code, error_message FROM campaignd.recipients"
            " UNION ALL SELECT status_reason, stuck_reason FROM campaignd.campaigns"
            " UNION ALL SELECT paused_reason, lease_owner FROM campaignd.senders"
        )
        for value in row.values()
    )
    assert "refused" in stored and "invalid token" in stored and "ClientConnectorError" in stored
    for secret in (HEADER_TOKEN, QUERY_TOKEN):
        assert secret not in stored
        assert secret not in daemon.log()
        assert secret not in metrics


async def test_a_bug_reading_an_answer_is_logged_without_the_token_it_quotes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """The send path's catch-all logs a bug's traceback, message included: through the
    sender's redactor. The bug here is a classifier that raises once the answer is in, which
    must also leave the recipient in doubt (the provider has it), not pause the sender."""
    config = daemon_config(
        tmp_path,
        database_url,
        {"echo": {"url": fake.url, "headers": {"Authorization": "env:ECHO_TOKEN"}, "resend_in_doubt": False}},
        max_attempts=2,
    )
    campaign_id = await create_campaign(conn, "echo", 3)
    daemon = daemons(
        config,
        env={
            "ECHO_TOKEN": f"Bearer {HEADER_TOKEN}",
            "QUOTED_TOKEN": HEADER_TOKEN,
            **bug_planted("broken_classifier"),
        },
    )

    await wait_status(conn, campaign_id, "completed", timeout=60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    assert "send_failed_unexpectedly" in daemon.log() and "cannot read" in daemon.log()
    assert HEADER_TOKEN not in daemon.log()
    # Answered, so delivered as far as anyone knows: failed in doubt, never sent again, and
    # the sender not paused as if the request could not be built.
    assert await state_counts(conn, campaign_id) == {"failed": 3}
    assert fake.request_count() == 3
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'echo'") is None
    stored = await conn.fetch("SELECT error_code, error_message FROM campaignd.recipients")
    assert all(HEADER_TOKEN not in str(value) for row in stored for value in row.values())
