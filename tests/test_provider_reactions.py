"""A running daemon against local fakes of the real provider APIs: each error class gets the
reaction at its scope (README "Providers").

Real ``campaignd run`` processes, a real PostgreSQL; the fakes answer with the providers' own
error envelopes.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignd import operator as campaignd_operator
from campaignd.sql import QUERIES
from tests.conftest import (
    add_numbered_recipients,
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_status,
)
from tests.pgproxy import PgProxy
from tests.provider_fakes import FakeTwilio, FakeWhatsApp, Reply, meta_error
from tests.test_preparation import lock_recipient, log_events, preparation_waits_for_lock, with_timeouts

TOKEN = "EAAtest-whatsapp-token-0123456789"
TWILIO_SID = "AC" + "1" * 32
TWILIO_TOKEN = "twilio-auth-token-0123456789"
TEMPLATE = {
    "type": "template",
    "template": {
        "name": "spring_sale",
        "language": {"code": "en_US"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "{{name}}"}]}],
    },
}


@pytest.fixture
def whatsapp() -> Iterator[FakeWhatsApp]:
    fake = FakeWhatsApp(token=TOKEN)
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio(account_sid=TWILIO_SID, auth_token=TWILIO_TOKEN)
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


def _whatsapp_config(
    tmp_path: Path,
    database_url: str,
    fake: FakeWhatsApp,
    *,
    dispatch: dict[str, Any] | None = None,
    **sender: Any,
) -> Path:
    values = {
        "provider": "whatsapp",
        "phone_number_id": fake.phone_number_id,
        "access_token": "env:TEST_WHATSAPP_TOKEN",
        "api_base": fake.url,
        "rate_per_second": 300.0,
        **sender,
    }
    return daemon_config(tmp_path, database_url, {"wa": values}, **(dispatch or {}))


ENV = {"TEST_WHATSAPP_TOKEN": TOKEN}


def _numbers(prefix: str, count: int) -> list[tuple[str | None, dict[str, Any]]]:
    return [(f"+{prefix}{i:06d}", {"name": f"n{i}"}) for i in range(count)]


def _sent_to(fake: FakeWhatsApp | FakeTwilio, prefix: str) -> int:
    return sum(1 for request in fake.requests if (request.address or "").lstrip("+").startswith(prefix))


async def _failed_at_preflight(
    conn: asyncpg.Connection, campaign_id: str, whatsapp: FakeWhatsApp
) -> asyncpg.Record:
    """Waits for the campaign to fail at the pre-flight, and checks that nothing was sent and
    that its counters match its recipients; returns its row."""
    row = await wait_status(conn, campaign_id, "failed", timeout=60)
    assert row["status_reason"].startswith("pre-flight: ")
    assert whatsapp.requests == []
    await assert_counters_match(conn, campaign_id)
    return row


async def test_whatsapp_campaign_is_sent_with_its_template_and_callback_key(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    recipients = [
        *_numbers("1555", 50),
        ("not a number", {"name": "x"}),
        ("+1 (555) 999-0000", {"name": "y"}),
    ]
    campaign_id = await create_campaign(conn, "wa", recipients, message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert (row["sent_count"], row["skipped_count"]) == (51, 1)
    skipped = await conn.fetchrow(
        "SELECT address, error_code FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'skipped'",
        campaign_id,
    )
    assert (skipped["address"], skipped["error_code"]) == ("not a number", "invalid_address")
    first = next(r for r in whatsapp.requests if r.address == "1555000000")
    assert first.json["template"]["components"][0]["parameters"][0]["text"] == "n0"
    recipient_id = await conn.fetchval(
        "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 AND address = '+1555000000'", campaign_id
    )
    assert first.json["biz_opaque_callback_data"] == f"{campaign_id}:{recipient_id}"
    wamids = await conn.fetch(
        "SELECT provider_message_id FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'sent'",
        campaign_id,
    )
    assert {r["provider_message_id"] for r in wamids} == {sent.message_id for sent in whatsapp.sent}
    assert TOKEN not in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_expired_token_pauses_the_sender_and_all_its_campaigns(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    whatsapp.default = meta_error(
        190, "Error validating access token: Session has expired", subcode=463, status=401
    )
    first = await create_campaign(conn, "wa", _numbers("1555", 300), message=TEMPLATE, name="a")
    second = await create_campaign(conn, "wa", _numbers("1666", 300), message=TEMPLATE, name="b")
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    for campaign_id in (first, second):
        row = await wait_status(conn, campaign_id, "paused", timeout=60)
        assert "190" in row["status_reason"] or "463" in row["status_reason"]
        assert "Session has expired" in row["status_reason"]
    paused_reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'wa'")
    assert "Session has expired" in paused_reason
    # Stopped at once: nothing near the 600 recipients was tried, and nothing more goes out.
    tried = len(whatsapp.requests)
    assert tried < 100

    async def claims_given_back() -> bool:
        counts = [await state_counts(conn, campaign_id) for campaign_id in (first, second)]
        return all(c.get("in_flight", 0) == 0 for c in counts)

    await wait_for(claims_given_back, timeout=30, what="the paused lane's claims to go back")
    for campaign_id in (first, second):
        counts = await state_counts(conn, campaign_id)
        assert counts.get("failed", 0) == 0, "the recipients were not at fault"
        await assert_counters_match(conn, campaign_id)
    assert TOKEN not in paused_reason and TOKEN not in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert len(whatsapp.requests) == tried


async def test_template_rejection_pauses_only_that_campaign(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    for address, _ in _numbers("1777", 200):
        whatsapp.fail(
            address.lstrip("+"),
            meta_error(132001, "Template name does not exist in the translation", details="spring_sale"),
        )
    doomed = await create_campaign(conn, "wa", _numbers("1777", 200), message=TEMPLATE, name="doomed")
    healthy = await create_campaign(conn, "wa", _numbers("1555", 200), message=TEMPLATE, name="healthy")
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    paused = await wait_status(conn, doomed, "paused", timeout=60)
    await wait_status(conn, healthy, "completed", timeout=60)

    assert paused["status_reason"].startswith("provider rejected the campaign: 132001")
    assert "Template name does not exist" in paused["status_reason"]
    assert _sent_to(whatsapp, "1777") < 100
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'wa'") is None

    async def claims_given_back() -> bool:
        return (await state_counts(conn, doomed)).get("in_flight", 0) == 0

    await wait_for(claims_given_back, timeout=30, what="the paused campaign's claims to go back")
    counts = await state_counts(conn, doomed)
    assert counts.get("failed", 0) == 0, "the recipients were not at fault"
    await assert_counters_match(conn, doomed)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_generic_error_135000_trips_the_breaker_within_a_few_dozen(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    # The seeds' incident: 2,093 messages failed one by one with #135000.
    whatsapp.default = meta_error(135000, "Generic user error", status=400)
    campaign_id = await create_campaign(conn, "wa", _numbers("1555", 2093), message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await wait_status(conn, campaign_id, "paused", timeout=60)

    assert row["status_reason"] == (
        "circuit breaker: 20 consecutive failures with whatsapp error 135000 (Generic user error)"
    )
    assert len(whatsapp.requests) < 100
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_an_api_base_that_answers_200_to_everything_pauses_the_campaign_it_did_not_send(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    # A misrouted api_base (a web server, a captive proxy) accepts every request with a page
    # of its own: no message id, nothing delivered. Without an idempotency key nothing may be
    # sent again, so those recipients stay sent, marked; the campaign stops there.
    whatsapp.default = Reply(200, "<html>Welcome to nginx!</html>")
    campaign_id = await create_campaign(conn, "wa", _numbers("1555", 2000), message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await wait_status(conn, campaign_id, "paused", timeout=60)

    assert row["status_reason"] == (
        "circuit breaker: 20 consecutive failures with whatsapp error sent_without_id"
        " (HTTP 200 accepted the request without naming a message id)"
    )
    assert len(whatsapp.requests) < 100

    async def claims_given_back() -> bool:
        return (await state_counts(conn, campaign_id)).get("in_flight", 0) == 0

    await wait_for(claims_given_back, timeout=30, what="the paused campaign's claims to go back")
    sent = await conn.fetch(
        "SELECT provider_message_id, error_code FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'sent'",
        campaign_id,
    )
    assert len(sent) == len(whatsapp.requests), "each answered request is sent once, never resent"
    assert {(r["provider_message_id"], r["error_code"]) for r in sent} == {(None, "sent_without_id")}
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_pair_rate_limit_delays_only_that_recipient(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    whatsapp.fail(
        "1555000007",
        meta_error(131056, "(Business Account, Consumer Account) pair rate limit hit"),
        times=1,
    )
    campaign_id = await create_campaign(conn, "wa", _numbers("1555", 100), message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    async def others_sent() -> bool:
        return (await campaign(conn, campaign_id))["sent_count"] == 99

    await wait_for(others_sent, timeout=60, what="the 99 others sent")
    delayed = await conn.fetchrow(
        "SELECT state, attempts, error_code, next_attempt_at - now() AS wait"
        " FROM campaignd.recipients WHERE campaign_id = $1 AND address = '+1555000007'",
        campaign_id,
    )
    assert (delayed["state"], delayed["error_code"]) == ("pending", "131056")
    assert delayed["wait"].total_seconds() > 60, "it waits for the pair rate to recover"
    assert (await campaign(conn, campaign_id))["status"] == "sending"
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'wa'") is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_throttling_retries_the_recipient_without_spending_an_attempt(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    whatsapp.fail_next(5, meta_error(130429, "Rate limit hit", status=429, headers={"Retry-After": "1"}))
    campaign_id = await create_campaign(conn, "wa", _numbers("1555", 100), message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert row["sent_count"] == 100
    assert len(whatsapp.requests) == 105, "five throttled requests, each retried once"
    attempts = await conn.fetch(
        "SELECT attempts FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    assert {r["attempts"] for r in attempts} == {1}, "a throttled try spends no attempt"
    # One line per cut of the rate, which counts the answers behind it; not one per answer.
    lines = [json.loads(line) for line in daemon.log().splitlines() if '"sender_throttled"' in line]
    assert 1 <= len(lines) < 5
    assert lines[0]["throttled_answers"] == 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_preflight_fails_a_template_without_language_before_any_send(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    message = {"type": "template", "template": {"name": "spring_sale"}}
    campaign_id = await create_campaign(conn, "wa", _numbers("1555", 50), message=message)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await _failed_at_preflight(conn, campaign_id, whatsapp)

    assert "language" in row["status_reason"]

    # Its recipients end with it (the watchdog's sweep), counted, rather than pending for good.
    async def swept() -> bool:
        return await state_counts(conn, campaign_id) == {"skipped": 50}

    await wait_for(swept, timeout=30, what="the failed campaign's recipients swept")
    assert (await campaign(conn, campaign_id))["skipped_count"] == 50
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_preflight_judges_the_rest_of_a_big_campaign_whose_head_has_nobody_to_send(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    # With batch_size 5 the head is 50 recipients, none with an address: the pre-flight has
    # nothing to judge there, and must judge the first of the rest before any of it is sent.
    message = {"type": "template", "template": {"name": "spring_sale"}}
    recipients = [(None, {"name": "x"})] * 50 + _numbers("1555", 30)
    campaign_id = await create_campaign(conn, "wa", recipients, message=message)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp, dispatch={"batch_size": 5}), env=ENV)

    row = await _failed_at_preflight(conn, campaign_id, whatsapp)

    assert "language" in row["status_reason"]
    assert row["prepared_below"] is not None, "it took the head-first path"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_preflight_failure_while_paused_leaves_the_campaign_to_be_prepared_again(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    message = {"type": "template", "template": {"name": "spring_sale"}}
    recipients = [(None, {"name": "x"}), *_numbers("1555", 9)]
    campaign_id = await create_campaign(conn, "wa", recipients, message=message)
    # The preparation waits at the recipient without an address while the campaign is paused.
    blocker = await lock_recipient(database_url, campaign_id, 0)
    try:
        daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)
        await wait_for(lambda: preparation_waits_for_lock(conn), timeout=60, what="the preparation waiting")
        await campaignd_operator.pause_campaign(conn, campaign_id)
    finally:
        await blocker.close()

    async def rolled_back() -> bool:
        return "campaign_no_longer_sending" in daemon.log()

    await wait_for(rolled_back, timeout=30, what="the preparation rolled back")
    assert (await state_counts(conn, campaign_id)) == {"pending": 10}
    row = await campaign(conn, campaign_id)
    # Not prepared, so that a resume prepares it (and judges it) again rather than sending it.
    assert (row["status"], row["prepared_at"], row["prepared_below"]) == ("paused", None, None)
    await campaignd_operator.resume_campaign(conn, campaign_id)
    await _failed_at_preflight(conn, campaign_id, whatsapp)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_campaign_resumed_while_its_rest_was_being_judged_is_prepared_again(
    tmp_path: Path,
    database_url: str,
    conn: asyncpg.Connection,
    whatsapp: FakeWhatsApp,
    daemons: Any,
    proxy: PgProxy,
) -> None:
    """The rest's pre-flight finds the campaign paused and rolls the preparation back; the
    campaign is resumed before the lane hears so. The lane used to keep the campaign's run
    going with no preparation under way: it claimed in the head alone, and the campaign
    stayed SENDING for good."""
    message = {"type": "template", "template": {"name": "spring_sale"}}
    # batch_size 5: a head of 50, none with an address; the rest's preparation waits at its
    # own recipient without one (index 55) while the campaign is paused.
    recipients = [
        *([(None, {"name": "x"})] * 50),
        *_numbers("1555", 5),
        (None, {"name": "x"}),
        *_numbers("1666", 25),
    ]
    campaign_id = await create_campaign(conn, "wa", recipients, message=message)
    blocker = await lock_recipient(database_url, campaign_id, 55)
    try:
        # The held reply keeps the rest's transaction, and its lock on the lane, open: the
        # lease must outlast it, or the lane is lost and a new one prepares the campaign anew.
        dispatch = {"batch_size": 5, "lease_seconds": 12.0}
        config = _whatsapp_config(tmp_path, proxy.url, whatsapp, dispatch=dispatch)
        daemon = daemons(config, env=ENV)
        await wait_for(lambda: preparation_waits_for_lock(conn), timeout=60, what="the rest's preparation")
        await campaignd_operator.pause_campaign(conn, campaign_id)
        # Its pre-flight will fail the campaign only if it is SENDING: paused, it rolls back.
        proxy.delay_reply(QUERIES["fail_campaign"], execution=1, seconds=3.0)
    finally:
        await blocker.close()
    assert await asyncio.to_thread(proxy.held.wait, 30), "the pre-flight never tried to fail it"
    await campaignd_operator.resume_campaign(conn, campaign_id)
    assert proxy.holding.is_set(), "resumed only after the lane heard back: nothing was staged"

    row = await _failed_at_preflight(conn, campaign_id, whatsapp)
    assert "language" in row["status_reason"]
    assert "preparation of the rest" in daemon.log(), "the rest's preparation did not roll back"
    assert daemon.log().count("lane_acquired") == 1, (
        "the lane was lost and taken again: a new lane prepares anew, and tests nothing here"
    )
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0


async def test_twilio_timeout_is_in_doubt_not_resent_by_default(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, twilio: FakeTwilio, daemons: Any
) -> None:
    # Twilio takes no idempotency key: a request that timed out may have been delivered, so
    # it ends failed as in_doubt rather than risk a second SMS.
    twilio.latency_seconds = 3.0
    sender = {
        "provider": "twilio",
        "account_sid": TWILIO_SID,
        "auth_token": "env:TEST_TWILIO_TOKEN",
        "from_number": "+15017122661",
        "api_base": twilio.url,
        "timeout_seconds": 0.5,
    }
    config = daemon_config(tmp_path, database_url, {"tw": sender})
    campaign_id = await create_campaign(conn, "tw", _numbers("1555", 5), message={"body": "Hi {{name}}"})
    daemon = daemons(config, env={"TEST_TWILIO_TOKEN": TWILIO_TOKEN})

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert row["failed_count"] == 5
    codes = await conn.fetch(
        "SELECT error_code, attempts FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    assert {(r["error_code"], r["attempts"]) for r in codes} == {("in_doubt", 1)}
    assert len(twilio.requests) == 5, "each was requested once"
    assert TWILIO_TOKEN not in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_one_phone_number_written_several_ways_is_sent_one_message(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    # WhatsApp receives a number as its digits, however the host wrote it: these four were one
    # person sent four messages. An address the send path refuses ("1555 000 1111x") keeps its
    # own key: it is skipped as invalid, and does not take a sendable number's place.
    same = ["+15550001111", "+1 (555) 000-1111", "15550001111", "+15550001111\t", "1555.000.1111"]
    recipients = [
        ("1555 000 1111x", {"name": "invalid"}),
        *[(address, {"name": f"same{i}"}) for i, address in enumerate(same)],
        ("+15550002222", {"name": "other"}),
    ]
    campaign_id = await create_campaign(conn, "wa", recipients, message=TEMPLATE)
    daemon = daemons(_whatsapp_config(tmp_path, database_url, whatsapp), env=ENV)

    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    assert sorted(r.address for r in whatsapp.requests) == ["15550001111", "15550002222"]
    first = next(r for r in whatsapp.requests if r.address == "15550001111")
    assert first.json["template"]["components"][0]["parameters"][0]["text"] == "same0"
    skips = await conn.fetch(
        "SELECT address, error_code FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'skipped' ORDER BY id",
        campaign_id,
    )
    assert [(r["address"], r["error_code"]) for r in skips] == [
        ("1555 000 1111x", "invalid_address"),
        *[(address, "duplicate_address") for address in same[1:]],
    ]
    assert (row["sent_count"], row["skipped_count"]) == (2, 5)
    await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_the_duplicates_of_a_campaign_the_statistics_know_nothing_of_take_one_pass(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, whatsapp: FakeWhatsApp, daemons: Any
) -> None:
    # A campaign loaded and started at once, before any ANALYZE has seen it: for phone numbers
    # (WhatsApp, Twilio) the planner took it for a few rows and joined its rest with its
    # repeated numbers by a nested loop, grouping the whole campaign again for each recipient.
    # The rest of these 20,000 took over 30 s; with a 2 s statement_timeout here, it timed
    # out at 2, 16 and 128 s, and the campaign failed.
    await conn.execute("ALTER TABLE campaignd.recipients SET (autovacuum_enabled = false)")
    without_variables = {"type": "template", "template": {"name": "hello", "language": {"code": "en_US"}}}
    campaign_id = await create_campaign(conn, "wa", [("+15550000000", {})], message=without_variables)
    await add_numbered_recipients(conn, campaign_id, 20_000)
    statistics = await conn.fetchval(
        "SELECT reltuples FROM pg_class WHERE oid = 'campaignd.recipients'::regclass"
    )
    assert statistics in (-1, 0), "the table has statistics: the planner would know the campaign"
    config = _whatsapp_config(tmp_path, database_url, whatsapp, dispatch={"batch_size": 100})
    daemon = daemons(with_timeouts(config, 2.0), env=ENV)

    async def rest_prepared() -> bool:
        return bool(log_events(daemon, "campaign_prepared"))

    await wait_for(rest_prepared, timeout=30, what="the rest prepared")

    assert not log_events(daemon, "prepare_tail_timed_out")
    assert (await campaign(conn, campaign_id))["total_count"] == 20_001
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
