"""A database whose server encoding is not UTF8 (README: "any server encoding").

A provider's text with a character such an encoding cannot hold (an error message with '✓' or
'—', a message id with one) is stored with that character escaped (``\\u2713``): written as it
came, the database refused it (UntranslatableCharacterError), the lane crashed at every outcome
write, and the recipient, left in flight, was resent by every next owner of the lane; a sender
pause quoting such a text was never written, and the rejected credential was tried in a loop.

Real ``campaignd run`` processes against a LATIN1 database on the test server, the fake
generic provider; the table of encodings checked against the server's own conversions.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import FakeProvider, Rule
from campaignd.outcomes import ERROR_MESSAGE_LIMIT, RecipientState, ResultKind, SendResult, decide
from campaignd.schema import migrate
from campaignd.storable import storable_result, storable_text
from tests.conftest import (
    assert_counters_match,
    bug_planted,
    create_campaign,
    daemon_config,
    drop_database,
    wait_for,
    wait_status,
    with_database,
)


async def _create_database(pg_url: str, encoding: str) -> str:
    name = f"t_{encoding.lower()}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(
            f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    finally:
        await admin.close()
    return name


@pytest.fixture
async def latin1_url(pg_url: str) -> AsyncIterator[str]:
    name = await _create_database(pg_url, "LATIN1")
    url = with_database(pg_url, name)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await migrate(connection)
    finally:
        await connection.close()
    yield url
    await drop_database(pg_url, name)


@pytest.fixture
async def latin1(latin1_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(DatabaseConfig(url=latin1_url))  # type: ignore[arg-type]
    assert connection.get_settings().server_encoding == "LATIN1"
    yield connection
    await connection.close()


def events(daemon: Any) -> Counter[str]:
    return Counter(json.loads(line)["event"] for line in daemon.log().splitlines() if line.startswith("{"))


async def recipient(connection: asyncpg.Connection, campaign_id: str, address: str) -> asyncpg.Record:
    row = await connection.fetchrow(
        "SELECT state, attempts, provider_message_id, error_code, error_message"
        " FROM campaignd.recipients WHERE campaign_id = $1 AND address = $2",
        campaign_id,
        address,
    )
    assert row is not None
    return row


async def nothing_in_flight(connection: asyncpg.Connection, campaign_id: str) -> bool:
    return not await connection.fetchval(
        "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight'",
        campaign_id,
    )


async def test_provider_texts_latin1_cannot_hold_are_stored_escaped_and_the_campaign_completes(
    tmp_path: Path, latin1_url: str, latin1: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    refused, odd_id, flaky, verbose = "+15550000003", "+15550000005", "+15550000007", "+15550000009"
    rules = fake.behaviour.rules
    rules[refused] = Rule(
        400, {"error": {"code": "invalid_number", "message": "num\u00e9ro \u2713 \u2014 r\u00e9seau"}}
    )
    rules[odd_id] = Rule(200, {"id": "msg\u2014\u2713\u00e9-1"})
    rules[flaky] = Rule(500, {"error": {"code": "surcharge\u2713", "message": "busy \u2713"}}, times=1)
    rules[verbose] = Rule(400, {"error": {"code": "invalid_number", "message": "\u2713" * 600}})
    campaign_id = await create_campaign(latin1, "sms", 40)
    daemon = daemons(daemon_config(tmp_path, latin1_url, {"sms": {"url": fake.url}}))

    row = await wait_status(latin1, campaign_id, "completed", timeout=60)

    seen = events(daemon)
    assert seen["lane_crashed"] == 0 and seen["outcome_unrecordable"] == 0, seen
    assert (row["sent_count"], row["failed_count"]) == (38, 2)
    # Each recipient was sent once, the one that failed once retried once.
    assert fake.request_count() == 41
    assert [fake.requests_by_address(a) for a in (refused, odd_id, flaky, verbose)] == [1, 1, 2, 1]
    assert fake.duplicate_keys() == {}
    # What LATIN1 holds is kept ('é'), the rest escaped.
    failed = await recipient(latin1, campaign_id, refused)
    assert (failed["state"], failed["error_code"]) == ("failed", "invalid_number")
    assert failed["error_message"] == "HTTP 400: num\u00e9ro \\u2713 \\u2014 r\u00e9seau"
    sent = await recipient(latin1, campaign_id, odd_id)
    assert (sent["state"], sent["provider_message_id"]) == ("sent", "msg\\u2014\\u2713\u00e9-1")
    retried = await recipient(latin1, campaign_id, flaky)
    assert (retried["state"], retried["attempts"]) == ("sent", 2)
    # Clipped as stored, escapes included, and its end marked in what LATIN1 holds.
    long = (await recipient(latin1, campaign_id, verbose))["error_message"]
    assert len(long) == ERROR_MESSAGE_LIMIT
    assert long.startswith("HTTP 400: \\u2713\\u2713") and long.endswith("\\u2026")
    await assert_counters_match(latin1, campaign_id)


async def test_a_sender_rejection_quoting_a_text_latin1_cannot_hold_pauses_the_sender(
    tmp_path: Path, latin1_url: str, latin1: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.fail_prefix_rules["+1555"] = Rule(
        401, {"error": {"code": "bad_token", "message": "token r\u00e9voqu\u00e9 \u2014 contact support"}}
    )
    campaign_id = await create_campaign(latin1, "sms", 30)
    daemon = daemons(daemon_config(tmp_path, latin1_url, {"sms": {"url": fake.url, "rate_per_second": 50.0}}))

    row = await wait_status(latin1, campaign_id, "paused", timeout=30)

    reason = (
        "provider rejected the sender: bad_token: HTTP 401: token r\u00e9voqu\u00e9 \\u2014 contact support"
    )
    assert row["status_reason"] == reason
    assert await latin1.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") == reason
    await wait_for(lambda: nothing_in_flight(latin1, campaign_id), timeout=10, what="claims given back")
    requests = fake.request_count()
    await asyncio.sleep(2)
    # The rejected credential is not tried again (it was, in a loop, when the pause failed).
    assert fake.request_count() == requests <= 30
    seen = events(daemon)
    assert seen["lane_crashed"] == 0 and seen["sender_paused"] == 1, seen
    await assert_counters_match(latin1, campaign_id)


async def test_a_circuit_breaker_pause_quoting_a_text_latin1_cannot_hold_pauses_the_campaign(
    tmp_path: Path, latin1_url: str, latin1: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.fail_prefix_rules["+1555"] = Rule(
        500, {"error": {"code": "surcharg\u00e9\u2713", "message": "serveur \u2014 occup\u00e9"}}
    )
    campaign_id = await create_campaign(latin1, "sms", 30)
    config = daemon_config(
        tmp_path,
        latin1_url,
        {"sms": {"url": fake.url, "rate_per_second": 50.0, "breaker_consecutive_failures": 5}},
    )
    daemon = daemons(config)

    row = await wait_status(latin1, campaign_id, "paused", timeout=30)

    assert row["status_reason"].startswith("circuit breaker: ")
    assert (
        "surcharg\u00e9\\u2713" in row["status_reason"]
        and "serveur \\u2014 occup\u00e9" in row["status_reason"]
    )
    await wait_for(lambda: nothing_in_flight(latin1, campaign_id), timeout=10, what="claims given back")
    stored = await latin1.fetch(
        "SELECT DISTINCT error_code, error_message FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND error_code IS NOT NULL",
        campaign_id,
    )
    assert [tuple(r) for r in stored] == [("surcharg\u00e9\\u2713", "HTTP 500: serveur \\u2014 occup\u00e9")]
    seen = events(daemon)
    assert seen["lane_crashed"] == 0 and seen["campaign_paused"] == 1, seen
    await assert_counters_match(latin1, campaign_id)


async def test_an_outcome_the_database_refuses_as_data_does_not_stay_in_flight(
    tmp_path: Path, latin1_url: str, latin1: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A daemon that does not convert (a bug planted): the refused batch takes the lane down,
    # and its salvage writes the refused outcome again with its texts in ASCII. Left in flight,
    # the recipient was resent, as in doubt, by each next owner of the lane, and the answer
    # refused again: a crash loop with a request per turn.
    refused = "+15550000004"
    fake.behaviour.rules[refused] = Rule(
        400, {"error": {"code": "invalid_number", "message": "num\u00e9ro \u2713 \u2014 r\u00e9seau"}}
    )
    campaign_id = await create_campaign(latin1, "sms", 20)
    config = daemon_config(tmp_path, latin1_url, {"sms": {"url": fake.url}})
    daemon = daemons(config, env=bug_planted("broken_encoding"))

    row = await wait_status(latin1, campaign_id, "completed", timeout=60)

    seen = events(daemon)
    assert seen["lane_crashed"] == 1 and seen["outcome_substituted"] == 1, seen
    assert (row["sent_count"], row["failed_count"]) == (19, 1)
    assert fake.requests_by_address(refused) == 1 and fake.request_count() == 20
    failed = await recipient(latin1, campaign_id, refused)
    assert (failed["state"], failed["error_code"]) == ("failed", "invalid_number")
    assert failed["error_message"] == "HTTP 400: num\\xe9ro \\u2713 \\u2014 r\\xe9seau"
    await assert_counters_match(latin1, campaign_id)


# Every server encoding PostgreSQL offers but UTF8 and SQL_ASCII (which store any text), and
# MULE_INTERNAL, which has no conversion from UTF8 (asyncpg's client encoding) at all.
SERVER_ENCODINGS = [
    *[f"LATIN{n}" for n in range(1, 11)],
    *[f"ISO_8859_{n}" for n in range(5, 9)],
    *[f"WIN{n}" for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)],
    "KOI8R",
    "KOI8U",
    "EUC_CN",
    "EUC_JP",
    "EUC_JIS_2004",
    "EUC_KR",
    "EUC_TW",
]


async def test_every_character_is_storable_in_every_server_encoding(pg_url: str) -> None:
    # Every code point of the first three planes but NUL and the surrogates, and a few beyond.
    everything = "".join(chr(c) for c in [*range(1, 0xD800), *range(0xE000, 0x30000), 0x1F600, 0x10FFFF])
    for encoding in SERVER_ENCODINGS:
        storable = storable_text(encoding)
        assert storable is not None
        text = storable(everything)
        assert storable(text) == text, encoding
        name = await _create_database(pg_url, encoding)
        try:
            connection = await asyncpg.connect(with_database(pg_url, name))
            try:
                assert connection.get_settings().server_encoding == encoding
                assert await connection.fetchval("SELECT $1::text", text) == text, encoding
            finally:
                await connection.close()
        finally:
            await drop_database(pg_url, name)


def test_utf8_and_sql_ascii_databases_convert_nothing() -> None:
    assert storable_text("UTF8") is None
    assert storable_text("SQL_ASCII") is None


def test_what_the_encoding_holds_is_kept_and_the_rest_escaped() -> None:
    latin1 = storable_text("LATIN1")
    assert latin1 is not None
    assert latin1("plain ascii \\ text") == "plain ascii \\ text"
    assert (
        latin1("r\u00e9seau \u2713 \u2014 \ufffd \U0001f600")
        == "r\u00e9seau \\u2713 \\u2014 \\ufffd \\U0001f600"
    )
    win1252 = storable_text("WIN1252")
    assert win1252 is not None and win1252("\u2014 \u2026 \u2713") == "\u2014 \u2026 \\u2713"
    # Python's euc_jp maps '¥', PostgreSQL's EUC_JP does not.
    euc_jp = storable_text("EUC_JP")
    assert euc_jp is not None and euc_jp("\u65e5\u672c \u00a5") == "\u65e5\u672c \\xa5"
    # A server that did not say: ASCII only.
    unknown = storable_text(None)
    assert unknown is not None and unknown("r\u00e9seau") == "r\\xe9seau"


def test_a_verdict_repeated_after_a_resume_is_recognised_in_its_stored_form() -> None:
    # decide() compares a verdict with the recipient's last one, read back from the database:
    # the comparison holds for a text the encoding cannot hold, long ones (clipped) included.
    latin1 = storable_text("LATIN1")
    assert latin1 is not None
    for message in ["token r\u00e9voqu\u00e9 \u2014 contact support", "\u2014" * 700]:
        result = storable_result(
            latin1, SendResult(ResultKind.SENDER_FATAL, error_code="bad\u2713", error_message=message)
        )
        assert result.error_message is not None and len(result.error_message) <= ERROR_MESSAGE_LIMIT
        assert latin1(result.error_message) == result.error_message
        first = decide(1, result, attempts=1, max_attempts=5, backoff_base=1, backoff_max=1, rng=None)  # type: ignore[arg-type]
        assert (first.state, first.attempt_adjust) == (RecipientState.PENDING, -1)
        again = decide(
            1,
            result,
            attempts=1,
            max_attempts=5,
            backoff_base=1,
            backoff_max=1,
            rng=None,  # type: ignore[arg-type]
            last_error=first.error_code,
            last_message=first.error_message,
        )
        assert again.attempt_adjust == 0, "repeated: the attempt is spent"
