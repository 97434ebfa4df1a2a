"""Whatever a host application writes, a running daemon neither crashes nor stalls: a bad
recipient ends skipped with a reason, a message no provider could take fails its campaign
with a reason, and everything else is sent as data.

Real ``campaignd run`` processes, a real PostgreSQL, the fake generic provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from campaignd.config import HttpSenderConfig
from campaignd.fakeprovider import FakeProvider, Rule
from campaignd.outcomes import ResultKind
from campaignd.providers import Delivery
from campaignd.providers.http import HttpProvider
from tests.conftest import assert_counters_match, create_campaign, daemon_config, wait_status

# The generic provider refuses addresses with whitespace (skipped, invalid_address); the rest
# are opaque to it and go out exactly as written.
REFUSED_ADDRESSES = [
    "+1555'; DROP TABLE campaignd.recipients; --",
    "$(rm -rf /)",
    '+1555" OR "1"="1',
]
HOSTILE_ADDRESSES = [
    "+1555';DROP/**/TABLE/**/campaignd.recipients;--",
    "$(reboot)",
    "`reboot`",
    "../../etc/passwd",
    "%s%s%s%n",
    "{{name}}",
    "😀📱",
    "a" * 300,
]


async def test_addresses_that_look_like_sql_or_shell_are_sent_as_data(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    addresses = HOSTILE_ADDRESSES + REFUSED_ADDRESSES
    recipients = [(address, {"name": f"n{i}"}) for i, address in enumerate(addresses)]
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemon = daemons(daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}))

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert (row["sent_count"], row["skipped_count"]) == (len(HOSTILE_ADDRESSES), len(REFUSED_ADDRESSES))
    assert {a.address for a in fake.accepted()} == set(HOSTILE_ADDRESSES)
    skipped = await conn.fetch(
        "SELECT address, error_code FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'skipped'",
        campaign_id,
    )
    assert {(r["address"], r["error_code"]) for r in skipped} == {
        (address, "invalid_address") for address in REFUSED_ADDRESSES
    }
    # The table the addresses name is still there, with every row.
    assert await conn.fetchval("SELECT count(*) FROM campaignd.recipients") == len(addresses)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_hostile_variables_skip_their_recipient_and_the_campaign_goes_on(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = {"n": deep}
    hostile = {
        "deeply nested": {"name": deep},
        "list": {"name": [1, 2, 3]},
        "huge": {"name": "y" * 1_000_000},
        "no name": {"other": "z"},
        "not an object": ["name", "x"],
    }
    recipients: list[tuple[str | None, Any]] = [
        (f"+1555000{i:04d}", variables) for i, variables in enumerate(hostile.values())
    ]
    # Control characters and odd unicode are text like any other: sent as given.
    fine = {"name": "tab\there\x01\x7f\u202e\u0000".replace("\u0000", "")}
    recipients += [(f"+1666000{i:04d}", fine) for i in range(20)]
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemon = daemons(daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}))

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert (row["sent_count"], row["skipped_count"]) == (20, len(hostile))
    reasons = await conn.fetch(
        "SELECT error_code, error_message FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'skipped'",
        campaign_id,
    )
    assert all(r["error_code"] and r["error_message"] for r in reasons)
    assert {a.body["message"]["text"] for a in fake.accepted()} == {f"hello {fine['name']}"}
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_message_of_several_megabytes_fails_its_campaign_and_spares_the_next(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    huge = {"text": "hello {{name}} " + "w" * 3_000_000}
    doomed = await create_campaign(conn, "sms", 10, message=huge, name="huge")
    normal = await create_campaign(conn, "sms", 10, name="normal")
    daemon = daemons(daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}))

    failed = await wait_status(conn, doomed, "failed", timeout=60)
    await wait_status(conn, normal, "completed", timeout=60)

    assert "invalid message" in failed["status_reason"]
    assert "bytes" in failed["status_reason"]
    assert {a.campaign_id for a in fake.accepted()} == {normal}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_tls_failure_is_a_transient_connection_error_without_crash() -> None:
    # A server that answers a TLS ClientHello with plain HTTP (wrong version number), and
    # closes every connection it accepted before the test ends: no socket outlives the test.
    accepted: list[bytes] = []

    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(await reader.read(1024))
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(plain_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = HttpSenderConfig(
        url=f"https://127.0.0.1:{port}/send",
        headers={"Authorization": SecretStr("Bearer tls-secret-123")},
        timeout_seconds=5.0,
    )
    provider = HttpProvider("sms", config, connection_limit=2)
    try:
        result = await provider.send(Delivery("c", 1, "+15550001111", {"text": "hi"}))
    finally:
        await provider.close()
        server.close()
        await server.wait_closed()

    assert accepted, "the handshake reached the server"
    assert (result.kind, result.error_code) == (ResultKind.TRANSIENT, "connection_error")
    assert "SSL" in (result.error_message or "") or "TLS" in (result.error_message or "")
    assert "tls-secret-123" not in (result.error_message or "")


async def test_dns_failure_is_a_bounded_transient_error() -> None:
    # .invalid never resolves (RFC 2606); the lookup fails fast, or at worst times out.
    config = HttpSenderConfig(url="http://campaignd-test.invalid/send", timeout_seconds=5.0)
    provider = HttpProvider("sms", config, connection_limit=2)
    try:
        result = await provider.send(Delivery("c", 1, "+15550001111", {"text": "hi"}))
    finally:
        await provider.close()

    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code in ("connection_error", "timeout")
    if result.error_code == "connection_error":
        assert not result.maybe_delivered, "a name that never resolved carried nothing"


async def test_a_request_that_cannot_be_built_pauses_the_sender_instead_of_raising(
    fake: FakeProvider,
) -> None:
    # Config refuses such a header; this is the last line of defence should one slip through.
    config = HttpSenderConfig.model_construct(
        url=fake.url,
        headers={"Authorization": SecretStr("Bearer secret-1234\r\nX-Injected: 1")},
        timeout_seconds=5.0,
        resend_in_doubt=True,
    )
    provider = HttpProvider("sms", config, connection_limit=2)
    try:
        result = await provider.send(Delivery("c", 1, "+15550001111", {"text": "hi"}))
    finally:
        await provider.close()

    assert (result.kind, result.error_code) == (ResultKind.SENDER_FATAL, "invalid_request")
    assert "secret-1234" not in (result.error_message or "")
    assert fake.request_count() == 0


async def test_a_provider_answer_with_nul_characters_is_stored_and_the_lane_goes_on(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # PostgreSQL's text refuses NUL: one in an answer used to fail the whole batch of outcomes
    # it was written with and take the lane down, its claims then failed in doubt.
    fake.behaviour.rules["+15550000001"] = Rule(200, {"id": "m\x00x"})
    fake.behaviour.rules["+15550000002"] = Rule(
        400, {"error": {"code": "bad\x00code", "message": "no\x00pe"}}
    )
    campaign_id = await create_campaign(conn, "sms", 40)
    daemon = daemons(daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}))

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert (row["sent_count"], row["failed_count"]) == (39, 1)
    stored = await conn.fetchrow(
        "SELECT (SELECT provider_message_id FROM campaignd.recipients"
        "         WHERE campaign_id = $1 AND address = '+15550000001') AS message_id,"
        "       (SELECT error_code || ' ' || error_message FROM campaignd.recipients"
        "         WHERE campaign_id = $1 AND address = '+15550000002') AS error",
        campaign_id,
    )
    assert stored["message_id"] == "m\ufffdx"
    assert "bad\ufffdcode" in stored["error"] and "no\ufffdpe" in stored["error"]
    # Every recipient asked once: the lane never fell over to leave claims in doubt.
    assert fake.request_count() == 40
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "Traceback" not in daemon.log()


async def test_json_this_client_cannot_decode_refuses_its_recipient_or_campaign_and_spares_the_rest(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # PostgreSQL takes numbers beyond a double's range and nesting deeper than the decoder's
    # 1,024 levels. Decoding them used to fail the claim (already committed) or the read of
    # the sender's campaigns, again on every restart of the lane: no campaign of the sender
    # was ever sent.
    deep = "[" * 1100 + "]" * 1100
    recipients = await create_campaign(conn, "sms", 60, start=False, name="recipients")
    for index, variables in ((30, '{"name": 1e400}'), (31, f'{{"name": {deep}}}'), (2, '{"name": -1e999}')):
        await conn.execute(
            "UPDATE campaignd.recipients SET variables = $2::text::jsonb"
            " WHERE campaign_id = $1 AND address = $3",
            recipients,
            variables,
            f"+1555{index:07d}",
        )
    message = await create_campaign(conn, "sms", 5, start=False, name="message")
    await conn.execute(
        'UPDATE campaignd.campaigns SET message = \'{"text": "hi {{name}}", "n": 1e400}\'::jsonb'
        " WHERE id = $1",
        message,
    )
    normal = await create_campaign(conn, "sms", 5, start=False, name="normal")
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = ANY($1::uuid[])",
        [recipients, message, normal],
    )
    daemon = daemons(daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}))

    done = await wait_status(conn, recipients, "completed", timeout=60)
    failed = await wait_status(conn, message, "failed", timeout=60)
    await wait_status(conn, normal, "completed", timeout=60)

    assert (done["sent_count"], done["skipped_count"], done["failed_count"]) == (57, 3, 0)
    reasons = await conn.fetch(
        "SELECT error_code, error_message FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'skipped'",
        recipients,
    )
    assert {r["error_code"] for r in reasons} == {"bad_variable"}
    assert all("cannot be read" in r["error_message"] for r in reasons)
    assert "cannot be read" in failed["status_reason"]
    # Nothing was claimed twice, nothing failed in doubt: the lane never fell over.
    assert fake.request_count() == 57 + 5
    await assert_counters_match(conn, recipients)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "Traceback" not in daemon.log()


async def test_a_campaign_rate_no_cap_can_be_sized_for_is_refused_when_written(
    conn: asyncpg.Connection,
) -> None:
    campaign_id = await create_campaign(conn, "sms", 1, start=False)
    await conn.execute("UPDATE campaignd.campaigns SET rate_per_second = 1000000 WHERE id = $1", campaign_id)

    for rate in ("NaN", "Infinity", "1e308", "1000000.5"):
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE campaignd.campaigns SET rate_per_second = $2::text::double precision WHERE id = $1",
                campaign_id,
                rate,
            )
