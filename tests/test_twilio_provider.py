"""The Twilio adapter, through a local fake that speaks Twilio's Messages API, and its classifier."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from campaignd.config import TwilioSenderConfig
from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers import build_provider
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.providers.twilio import TWILIO_CODES, TwilioProvider, classify_twilio
from tests.provider_fakes import FakeTwilio, Reply, closing_providers, served, twilio_error

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "f00dfeedc0ffee5eed0123456789abcd"
SERVICE = "MG" + "fedcba9876543210" * 2
FROM = "+15557770000"
TO = "+15550001111"
MESSAGE = {"body": "Hi Ada"}
MakeProvider = Callable[..., TwilioProvider]
K = ResultKind
ISSUE_CODES: list[tuple[int, ResultKind]] = [
    (30008, K.TRANSIENT),
    *[(code, K.THROTTLED) for code in (20429, 21611, 30022)],
    *[(code, K.RECIPIENT_PERMANENT) for code in (21211, 21610, 21614, 30004, 30005, 30006)],
    # The From number cannot message this destination (a short code abroad): per recipient.
    (21606, K.RECIPIENT_PERMANENT),
    # Too many messages between this pair of numbers: only this recipient waits.
    (14107, K.RECIPIENT_DELAY),
    *[(code, K.SENDER_FATAL) for code in (20003, 30002, 30034)],
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with served(FakeTwilio(account_sid=SID, auth_token=TOKEN)) as server:
        yield server


def _config(api_base: str, **overrides: Any) -> TwilioSenderConfig:
    fields: dict[str, Any] = {
        "provider": "twilio",
        "account_sid": SID,
        "auth_token": SecretStr(TOKEN),
        "from_number": FROM,
        "api_base": api_base,
        "timeout_seconds": 5.0,
    }
    return TwilioSenderConfig(**(fields | overrides))


@pytest.fixture
async def make_provider(fake: FakeTwilio) -> AsyncIterator[MakeProvider]:
    async with closing_providers() as made:
        yield lambda **overrides: made(
            TwilioProvider("sms", _config(fake.url, **overrides), connection_limit=4)
        )


def _delivery(message: Any = MESSAGE, address: str = TO) -> Delivery:
    return Delivery("9d1e7a8e-1d2b-4c3e-9f7a-2f1e0d9c8b7a", 3, address, message)


# ----------------------------------------------------------------- the request


async def test_request_is_form_encoded_with_basic_auth(fake: FakeTwilio, make_provider: MakeProvider) -> None:
    result = await make_provider().send(_delivery())

    [request] = fake.requests
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.form == {"To": [TO], "From": [FROM], "Body": ["Hi Ada"]}
    [sent] = fake.sent
    assert result == SendResult(ResultKind.SENT, provider_message_id=sent.message_id)
    assert sent.message_id.startswith("SM")


async def test_messaging_service_media_and_status_callback(
    fake: FakeTwilio, make_provider: MakeProvider
) -> None:
    provider = make_provider(
        from_number=None, messaging_service_sid=SERVICE, status_callback="https://host.example/twilio/status"
    )
    message = {"body": "Hi Ada & co = 100%", "media_url": ["https://x/a.png", "https://x/b.png"]}

    assert (await provider.send(_delivery(message))).kind is ResultKind.SENT
    assert (
        await provider.send(_delivery({"body": "", "media_url": "https://x/c.png"}))
    ).kind is ResultKind.SENT

    first, second = (r.form for r in fake.requests)
    assert first == {
        "To": [TO],
        "MessagingServiceSid": [SERVICE],
        "StatusCallback": ["https://host.example/twilio/status"],
        "Body": ["Hi Ada & co = 100%"],
        "MediaUrl": ["https://x/a.png", "https://x/b.png"],
    }
    assert "Body" not in second
    assert second["MediaUrl"] == ["https://x/c.png"]


async def test_build_provider_makes_twilio_provider_without_in_doubt_resends(fake: FakeTwilio) -> None:
    provider = build_provider("sms", _config(fake.url), connection_limit=2)
    try:
        assert isinstance(provider, TwilioProvider)
        assert (provider.name, provider.resend_in_doubt) == ("twilio", False)
        assert provider.normalize_address("1 555-000-1111") == TO
    finally:
        await provider.close()


# ----------------------------------------------------------------- codes, through the fake


@pytest.mark.parametrize(("code", "kind"), ISSUE_CODES)
async def test_issue_code_through_the_real_envelope(
    fake: FakeTwilio, make_provider: MakeProvider, code: int, kind: ResultKind
) -> None:
    fake.fail(TO, twilio_error(code, "Some text", status=429 if kind is K.THROTTLED else 400))

    result = await make_provider().send(_delivery())

    assert (result.kind, result.error_code, result.error_message) == (kind, str(code), f"(#{code}) Some text")
    assert fake.sent == []


@pytest.mark.parametrize(("code", "kind"), sorted(TWILIO_CODES.items()))
async def test_every_table_code_round_trips(
    fake: FakeTwilio, make_provider: MakeProvider, code: int, kind: ResultKind
) -> None:
    fake.fail(TO, twilio_error(code, "text"))

    assert (await make_provider().send(_delivery())).kind is kind


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        (twilio_error(20500, "Internal Server Error", status=500), K.TRANSIENT, "20500"),
        (twilio_error(29999, "Something new", status=503), K.TRANSIENT, "29999"),
        (twilio_error(29998, "Slow down", status=429, headers={"Retry-After": "4"}), K.THROTTLED, "29998"),
        (twilio_error(29997, "Something new", status=400), K.UNKNOWN, "29997"),
        (Reply(502, "<html>Bad Gateway</html>"), K.TRANSIENT, "http_502"),
        (Reply(504, "<html>Gateway Timeout</html>"), K.TRANSIENT, "http_504"),
        (Reply(503), K.TRANSIENT, "http_503"),
        (Reply(429, None, {"Retry-After": "4"}), K.THROTTLED, "http_429"),
        (Reply(301, None, {"Location": "https://elsewhere/"}), K.TRANSIENT, "http_301"),
        (Reply(404, "<html>nope</html>"), K.UNKNOWN, "http_404"),
    ],
)
async def test_codes_outside_the_table_and_bare_statuses(
    fake: FakeTwilio, make_provider: MakeProvider, reply: Reply, kind: ResultKind, code: str
) -> None:
    fake.fail(TO, reply)

    result = await make_provider().send(_delivery())

    assert (result.kind, result.error_code) == (kind, code)
    assert result.retry_after_seconds == (4.0 if kind is K.THROTTLED else None)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(201, "<html>created</html>"),
        Reply(201),
        Reply(200, {"status": "queued"}),
        Reply(201, b'{"sid": "SM', truncate=True),
    ],
)
async def test_2xx_is_sent_even_without_a_readable_sid(
    fake: FakeTwilio, make_provider: MakeProvider, reply: Reply
) -> None:
    fake.fail(TO, reply)

    result = await make_provider().send(_delivery())

    assert (result.kind, result.provider_message_id, result.error_code) == (
        ResultKind.SENT,
        None,
        "sent_without_id",
    )
    assert not result.maybe_delivered


async def test_wrong_credentials_pause_the_sender(fake: FakeTwilio, make_provider: MakeProvider) -> None:
    result = await make_provider(auth_token=SecretStr("0" * 32)).send(_delivery())

    assert (result.kind, result.error_code) == (ResultKind.SENDER_FATAL, "20003")


@pytest.mark.parametrize(
    ("status", "code", "in_doubt"),
    [(504, 20500, True), (502, 20503, True), (500, 20500, False), (504, 21211, False)],
)
def test_a_gateway_status_with_twilio_s_envelope_may_still_have_delivered(
    status: int, code: int, in_doubt: bool
) -> None:
    # Only the bare status counted: with an envelope the recipient was resent.
    body = orjson.dumps({"code": code, "message": "x", "status": status})

    assert classify_twilio(status, body, {}).maybe_delivered is in_doubt


def test_an_answer_that_is_not_utf8_is_still_read() -> None:
    body = '{"code": 21211, "message": "Le numéro n\'est pas valide", "status": 400}'.encode("latin-1")

    result = classify_twilio(400, body, {})

    assert (result.kind, result.error_code) == (ResultKind.RECIPIENT_PERMANENT, "21211")
    assert result.error_message == "(#21211) Le num\ufffdro n'est pas valide"


async def test_timeout_is_transient(fake: FakeTwilio, make_provider: MakeProvider) -> None:
    fake.default = Reply(201, {"sid": "SMlate"}, delay_seconds=2.0)

    result = await make_provider(timeout_seconds=0.2).send(_delivery())

    assert (result.kind, result.error_code) == (ResultKind.TRANSIENT, "timeout")
    # The request left: the provider may have delivered it, so it is not blindly retried.
    assert result.maybe_delivered


@pytest.mark.parametrize(
    "text",
    [
        f"Authenticate with token {TOKEN}",
        "Authorization was Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode(),
        f"see https://api.twilio.com/x?AuthToken={TOKEN}",
    ],
)
async def test_credentials_never_reach_the_error_message(
    fake: FakeTwilio, make_provider: MakeProvider, text: str
) -> None:
    fake.fail(TO, twilio_error(20003, text, status=401))

    result = await make_provider().send(_delivery())

    assert result.error_message is not None
    assert TOKEN not in result.error_message
    assert base64.b64encode(f"{SID}:{TOKEN}".encode()).decode() not in result.error_message


@given(status=st.integers(min_value=100, max_value=599), body=st.binary(max_size=200))
def test_classifier_never_raises_on_any_bytes(status: int, body: bytes) -> None:
    assert isinstance(classify_twilio(status, body, {"Retry-After": "x"}), SendResult)


# ----------------------------------------------------------------- addresses and pre-flight


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("+1 (555) 000-1111", TO), ("15550001111", TO), ("+44 7700 900123", "+447700900123")],
)
def test_numbers_are_sent_as_plus_digits(raw: str, expected: str) -> None:
    assert TwilioProvider.__new__(TwilioProvider).normalize_address(raw) == expected


@pytest.mark.parametrize("raw", ["", "07700 900123", "+1 555 ABC", "+12", "whatsapp:+15550001111"])
def test_invalid_numbers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        TwilioProvider.__new__(TwilioProvider).normalize_address(raw)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([MESSAGE], None),
        ([{"media_url": ["https://x/a.png"]}], None),
        ([{"body": "", "media_url": "https://x/a.png"}], None),
        ([{}], '"body" or a "media_url"'),
        (["Hi"], "JSON object"),
        ([{"Body": "Hi"}], "unknown field 'Body'"),
        ([{"body": "x" * 1601}], "over the limit of 1600"),
        ([{"body": "x" * 1601}, MESSAGE], None),
        ([{"body": ""}], "all of the first 1"),
        ([{"media_url": "ftp://x/a.png"}], "all of the first 1"),
        # Text that is not a URL came from one recipient's variables: skipped, not failed.
        ([{"media_url": ""}, {"media_url": "https://x/a.png"}], None),
        ([{"media_url": ["https://x/a.png", "x"]}, MESSAGE], None),
        ([{"media_url": 5}, MESSAGE], "http(s) URL"),
        ([{"media_url": ["https://x/a.png", 5]}, MESSAGE], "http(s) URL"),
        ([{"media_url": [f"https://x/{i}.png" for i in range(11)]}], "at most 10"),
        ([{"body": 5}], "must be text"),
    ],
)
def test_check_messages(messages: list[Any], reason: str | None) -> None:
    found = TwilioProvider.__new__(TwilioProvider).check_messages(messages)

    assert found is None if reason is None else reason in (found or "")


async def test_invalid_message_is_skipped_without_a_request(
    fake: FakeTwilio, make_provider: MakeProvider
) -> None:
    result = await make_provider().send(_delivery({"body": "x" * 2000}))

    assert (result.kind, result.error_code) == (ResultKind.SKIPPED, "invalid_message")
    assert fake.requests == []
