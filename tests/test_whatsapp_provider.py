"""The WhatsApp Cloud API adapter, through a local fake that speaks the real API, and Meta's classifier."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from campaignd.config import WhatsAppSenderConfig
from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers import build_provider
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.providers.meta import (
    META_CODES,
    META_SUBCODES,
    RECIPIENT_DELAY_SECONDS,
    classify_meta,
    meta_wait,
)
from campaignd.providers.whatsapp import WhatsAppProvider, whatsapp_message_problem
from tests.provider_fakes import FakeWhatsApp, Reply, closing_providers, meta_error, served

TOKEN = "EAAGm0PX4ZCpsBAKZBtestTOKENvalue1234567890"
PHONE_ID = "106540352242922"
CAMPAIGN = "0b5d6a3e-9c1f-4c3e-8c7a-2f1e0d9c8b7a"
TO = "15550001111"
TEXT = {"type": "text", "text": {"body": "Hi Ada"}}
MakeProvider = Callable[..., WhatsAppProvider]

K = ResultKind
# The issue's table, written out independently of the adapter's (a code typed wrong there fails here).
ISSUE_CODES: list[tuple[int, ResultKind]] = [
    *[(code, K.TRANSIENT) for code in (1, 2, 131000, 131016, 1200)],
    *[(code, K.THROTTLED) for code in (4, 17, 32, 613, 80007, 130429, 131057)],
    *[(code, K.RECIPIENT_DELAY) for code in (131056, 131049)],
    *[(code, K.RECIPIENT_PERMANENT) for code in (131026, 131047, 131050, 131021)],
    *[(code, K.SENDER_FATAL) for code in (0, 190, 10, 200, 201, 250, 299, 368, 131031, 131042, 131048)],
    *[(code, K.CAMPAIGN_FATAL) for code in (132000, 132001, 132012, 132015, 132016, 131051, 131053)],
    (135000, K.UNKNOWN),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeWhatsApp]:
    async with served(FakeWhatsApp(token=TOKEN, phone_number_id=PHONE_ID)) as server:
        yield server


def _config(api_base: str, **overrides: Any) -> WhatsAppSenderConfig:
    fields: dict[str, Any] = {
        "provider": "whatsapp",
        "phone_number_id": PHONE_ID,
        "access_token": SecretStr(TOKEN),
        "api_base": api_base,
        "timeout_seconds": 5.0,
    }
    return WhatsAppSenderConfig(**(fields | overrides))


@pytest.fixture
async def make_provider(fake: FakeWhatsApp) -> AsyncIterator[MakeProvider]:
    async with closing_providers() as made:
        yield lambda api_base=None, **overrides: made(
            WhatsAppProvider("wa", _config(api_base or fake.url, **overrides), connection_limit=8)
        )


def _delivery(message: Any = TEXT, address: str = TO, recipient_id: int = 17) -> Delivery:
    return Delivery(CAMPAIGN, recipient_id, address, message)


# ----------------------------------------------------------------- the request


async def test_text_message_request_is_the_cloud_api_request(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    result = await make_provider().send(_delivery())

    [request] = fake.requests
    assert request.path == f"/v21.0/{PHONE_ID}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.query == {}
    assert request.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": TO,
        "type": "text",
        "text": {"body": "Hi Ada"},
        "biz_opaque_callback_data": f"{CAMPAIGN}:17",
    }
    [sent] = fake.sent
    assert result == SendResult(ResultKind.SENT, provider_message_id=sent.message_id)
    assert sent.message_id.startswith("wamid.")


async def test_template_with_header_media_and_body_parameters_is_sent_as_written(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    template = {
        "type": "template",
        "template": {
            "name": "spring_sale",
            "language": {"code": "en_US"},
            "components": [
                {"type": "header", "parameters": [{"type": "image", "image": {"link": "https://x/a.png"}}]},
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": "Ada"}, {"type": "text", "text": "20%"}],
                },
            ],
        },
    }

    result = await make_provider().send(_delivery(template))

    assert result.kind is ResultKind.SENT
    [request] = fake.requests
    assert request.json["template"] == template["template"]
    assert request.json["type"] == "template"


async def test_build_provider_makes_whatsapp_provider_without_in_doubt_resends(fake: FakeWhatsApp) -> None:
    provider = build_provider("wa", _config(fake.url), connection_limit=4)
    try:
        assert isinstance(provider, WhatsAppProvider)
        assert (provider.sender_id, provider.name, provider.resend_in_doubt) == ("wa", "whatsapp", False)
        assert provider.normalize_address("+1 (555) 000-1111") == TO
    finally:
        await provider.close()


async def test_message_no_request_could_carry_is_skipped_without_a_request(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    result = await make_provider().send(_delivery({"type": "text", "text": {"body": "x" * 5000}}))

    assert result.kind is ResultKind.SKIPPED
    assert result.error_code == "invalid_message"
    assert fake.requests == []


async def test_many_sends_share_one_pool_and_close_is_idempotent(fake: FakeWhatsApp) -> None:
    provider = WhatsAppProvider("wa", _config(fake.url), connection_limit=2)
    try:
        results = [
            await provider.send(_delivery(address=f"1555000{i:04d}", recipient_id=i)) for i in range(5)
        ]
        await provider.close()
        await provider.close()
        results.append(await provider.send(_delivery(recipient_id=99)))
    finally:
        await provider.close()
    assert [r.kind for r in results] == [ResultKind.SENT] * 6
    assert len({r.provider_message_id for r in results}) == 6


# ----------------------------------------------------------------- every code, through the fake


@pytest.mark.parametrize(("code", "kind"), ISSUE_CODES)
async def test_issue_code_is_classified_through_the_real_envelope(
    fake: FakeWhatsApp, make_provider: MakeProvider, code: int, kind: ResultKind
) -> None:
    fake.fail(TO, meta_error(code, "Some title", details="Some details"))

    result = await make_provider().send(_delivery())

    assert result.kind is kind
    assert result.error_code == str(code)
    assert result.error_message == f"(#{code}) Some title: Some details"
    assert fake.sent == []


@pytest.mark.parametrize(("code", "kind"), sorted(META_CODES.items()))
async def test_every_table_code_round_trips_through_the_fake(
    fake: FakeWhatsApp, make_provider: MakeProvider, code: int, kind: ResultKind
) -> None:
    # Meta answers errors with loose statuses (throttling as 400, faults as 500): never decisive.
    fake.fail(TO, meta_error(code, "title", status=500 if code % 2 else 403))

    assert (await make_provider().send(_delivery())).kind is kind


@pytest.mark.parametrize("code", [131056, 131049])
async def test_recipient_delay_codes_carry_their_wait(
    fake: FakeWhatsApp, make_provider: MakeProvider, code: int
) -> None:
    fake.fail(TO, meta_error(code, "limit"))

    result = await make_provider().send(_delivery())

    assert result.kind is ResultKind.RECIPIENT_DELAY
    assert result.retry_after_seconds == RECIPIENT_DELAY_SECONDS[code]
    assert 60 <= RECIPIENT_DELAY_SECONDS[code] <= 24 * 3600


async def test_unknown_code_is_unknown_with_meta_text(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    fake.fail(TO, meta_error(135000, "Generic user error"))

    result = await make_provider().send(_delivery())

    assert result == SendResult(
        ResultKind.UNKNOWN, error_code="135000", error_message="(#135000) Generic user error"
    )


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (429, 135000, ResultKind.THROTTLED),
        (429, 429, ResultKind.THROTTLED),
        (503, 135000, ResultKind.TRANSIENT),
        (400, 135000, ResultKind.UNKNOWN),
        (400, 80001, ResultKind.THROTTLED),
        (400, 80008, ResultKind.THROTTLED),
    ],
)
def test_an_unknown_code_is_read_by_its_status_where_that_is_unambiguous(
    status: int, code: int, kind: ResultKind
) -> None:
    # A 429 with a code the tables do not know was "unknown": three attempts, then failed,
    # and the sender never slowed down.
    result = classify_meta(status, orjson.dumps({"error": {"code": code, "message": "x"}}), {})

    assert result.kind is kind


async def test_scripted_errors_for_the_next_requests_then_success(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    fake.fail_next(2, meta_error(131000, "Something went wrong", status=500))
    provider = make_provider()

    kinds = [(await provider.send(_delivery(recipient_id=i))).kind for i in range(3)]

    assert kinds == [ResultKind.TRANSIENT, ResultKind.TRANSIENT, ResultKind.SENT]


# ----------------------------------------------------------------- throttling waits


def _buc(minutes: float) -> str:
    return orjson.dumps(
        {
            "102290129340398": [
                {"type": "whatsapp", "call_count": 100, "estimated_time_to_regain_access": minutes}
            ]
        }
    ).decode()


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"X-Business-Use-Case-Usage": _buc(5)}, 300.0),
        ({"Retry-After": "7", "X-Business-Use-Case-Usage": _buc(2)}, 120.0),
        ({"Retry-After": "900", "X-Business-Use-Case-Usage": _buc(2)}, 900.0),
        ({"X-App-Usage": '{"call_count": 100, "total_time": 20, "total_cputime": 10}'}, None),
        ({"X-Page-Usage": '{"call_count": 100, "estimated_time_to_regain_access": 3}'}, 180.0),
        ({"X-Business-Use-Case-Usage": _buc(0)}, None),
        ({"X-Business-Use-Case-Usage": _buc(100_000)}, 3600.0),
        ({"X-Business-Use-Case-Usage": "not json", "Retry-After": "soon"}, None),
    ],
)
async def test_throttled_answer_waits_the_longest_any_header_asks(
    fake: FakeWhatsApp, make_provider: MakeProvider, headers: dict[str, str], wait: float | None
) -> None:
    fake.fail(TO, meta_error(80007, "Rate limit issues", headers=headers))

    result = await make_provider().send(_delivery())

    assert result.kind is ResultKind.THROTTLED
    assert result.retry_after_seconds == wait


def test_retry_after_as_http_date_is_honoured() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)

    wait = meta_wait({"Retry-After": when})

    assert wait is not None
    assert 100 < wait <= 120


# ----------------------------------------------------------------- answers without an envelope


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        (Reply(502, "<html><body>Bad Gateway</body></html>"), ResultKind.TRANSIENT, "http_502"),
        (Reply(500), ResultKind.TRANSIENT, "http_500"),
        (Reply(408, "timeout"), ResultKind.TRANSIENT, "http_408"),
        (Reply(429, "<html>slow down</html>", {"Retry-After": "3"}), ResultKind.THROTTLED, "http_429"),
        (Reply(302, None, {"Location": "https://elsewhere/"}), ResultKind.TRANSIENT, "http_302"),
        (Reply(404, "<html>Not Found</html>"), ResultKind.UNKNOWN, "http_404"),
        (Reply(400, {"error": "flat string"}), ResultKind.UNKNOWN, "http_400"),
        (Reply(500, b'{"error": {"code": 131000, "mess', truncate=True), ResultKind.TRANSIENT, "http_500"),
    ],
)
async def test_answer_without_meta_envelope_is_classified_by_status(
    fake: FakeWhatsApp, make_provider: MakeProvider, reply: Reply, kind: ResultKind, code: str
) -> None:
    fake.fail(TO, reply)

    result = await make_provider().send(_delivery())

    assert (result.kind, result.error_code) == (kind, code)
    if kind is ResultKind.THROTTLED:
        assert result.retry_after_seconds == 3.0
    # A gateway's 502 may hide a request Meta took: in doubt, never resent by default.
    assert result.maybe_delivered is (reply.status == 502)


def test_a_gateway_timeout_may_have_delivered_the_message() -> None:
    result = classify_meta(504, b"<html>Gateway Time-out</html>", {})

    assert (result.kind, result.error_code) == (ResultKind.TRANSIENT, "http_504")
    assert result.maybe_delivered


@pytest.mark.parametrize(
    ("status", "error", "in_doubt"),
    [
        (504, {"code": 2, "message": "Service temporarily unavailable"}, True),
        (502, {"code": 1, "error_subcode": 99, "message": "An unknown error occurred"}, True),
        (504, {"code": 135000, "message": "Generic user error"}, True),
        (503, {"code": 2, "message": "Service temporarily unavailable"}, False),
        # A definite verdict is the provider's own answer, whatever the status around it.
        (504, {"code": 131026, "message": "Message undeliverable"}, False),
    ],
)
def test_a_gateway_status_with_meta_s_envelope_may_still_have_delivered(
    status: int, error: dict[str, Any], in_doubt: bool
) -> None:
    # Only the bare status counted: with an envelope the recipient was resent.
    result = classify_meta(status, orjson.dumps({"error": error}), {})

    assert result.maybe_delivered is in_doubt


def test_invalid_json_reply_is_in_doubt_as_meta_says_the_message_may_have_gone() -> None:
    error = {"code": 1, "error_subcode": 1357046, "message": "Received invalid JSON reply."}
    body = orjson.dumps({"error": error})

    result = classify_meta(500, body, {})

    assert (result.kind, result.error_code, result.maybe_delivered) == (ResultKind.TRANSIENT, "1357046", True)
    # Code 1 alone is Meta's own failure before sending: retried like any transient fault.
    assert not classify_meta(500, orjson.dumps({"error": {"code": 1, "message": "x"}}), {}).maybe_delivered


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, "<html>OK</html>"),
        Reply(200),
        Reply(200, {"messaging_product": "whatsapp"}),
        Reply(200, {"messages": [{"id": ""}]}),
        Reply(201, b'{"messages": [{"id": "wamid.cut', truncate=True),
    ],
)
async def test_2xx_is_sent_even_unreadable_because_a_resend_would_duplicate(
    fake: FakeWhatsApp, make_provider: MakeProvider, reply: Reply
) -> None:
    fake.fail(TO, reply)

    result = await make_provider().send(_delivery())

    # Sent, and noted: the circuit breaker pauses a campaign whose every answer is this one.
    assert (result.kind, result.provider_message_id, result.error_code) == (
        ResultKind.SENT,
        None,
        "sent_without_id",
    )
    assert result.error_message == f"HTTP {reply.status} accepted the request without naming a message id"


async def test_timeout_is_transient(fake: FakeWhatsApp, make_provider: MakeProvider) -> None:
    fake.latency_seconds = 2.0

    result = await make_provider(timeout_seconds=0.2).send(_delivery())

    assert (result.kind, result.error_code) == (ResultKind.TRANSIENT, "timeout")
    # The request left: the provider may have delivered it, so it is not blindly retried.
    assert result.maybe_delivered


async def test_closed_port_is_transient_connection_error(make_provider: MakeProvider) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = await make_provider(f"http://127.0.0.1:{port}/v21.0").send(_delivery())

    assert (result.kind, result.error_code) == (ResultKind.TRANSIENT, "connection_error")
    # Nothing was ever sent on a connection that was never made: safe to retry.
    assert not result.maybe_delivered


# ----------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "reply",
    [
        meta_error(190, f"Malformed access token {TOKEN}", status=401),
        meta_error(100, "Invalid parameter", details=f"token was {TOKEN}"),
        meta_error(190, f"GET https://graph.facebook.com/v21.0/me?access_token={TOKEN}&x=1 failed"),
        meta_error(190, f"access_token={TOKEN[:30]} is not valid"),
        meta_error(190, f"token {TOKEN[:25]}... expired"),
        Reply(502, f"<html>upstream said Bearer {TOKEN}</html>"),
    ],
)
async def test_token_never_reaches_the_error_message(
    fake: FakeWhatsApp, make_provider: MakeProvider, reply: Reply
) -> None:
    fake.fail(TO, reply)

    result = await make_provider().send(_delivery())

    assert result.error_message is not None
    assert TOKEN[:20] not in result.error_message
    assert TOKEN[:20] not in (result.error_code or "")


async def test_wrong_token_is_refused_by_the_fake_as_meta_does(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    provider = WhatsAppProvider(
        "wa", _config(fake.url, access_token=SecretStr("EAAwrong" + "x" * 30)), connection_limit=1
    )
    try:
        result = await provider.send(_delivery())
    finally:
        await provider.close()

    assert (result.kind, result.error_code) == (ResultKind.SENDER_FATAL, "190")


async def test_wrong_phone_number_id_pauses_the_sender(
    fake: FakeWhatsApp, make_provider: MakeProvider
) -> None:
    result = await make_provider(phone_number_id="999").send(_delivery())

    assert (result.kind, result.error_code) == (ResultKind.SENDER_FATAL, "33")


# ----------------------------------------------------------------- the classifier alone


def test_known_subcode_decides_before_its_code() -> None:
    body = orjson.dumps({"error": {"code": 10, "error_subcode": 2018278, "message": "(#10) outside window"}})

    assert classify_meta(400, body, {}).error_code == "2018278"
    assert classify_meta(400, body, {}).kind is META_SUBCODES[2018278]


def test_code_as_digit_string_is_read() -> None:
    assert classify_meta(400, b'{"error": {"code": "131026", "message": "x"}}', {}).kind is (
        ResultKind.RECIPIENT_PERMANENT
    )


@given(status=st.integers(min_value=100, max_value=599), body=st.binary(max_size=300))
def test_classifier_never_raises_on_any_bytes(status: int, body: bytes) -> None:
    assert isinstance(classify_meta(status, body, {}), SendResult)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(
    status=st.integers(min_value=100, max_value=599),
    error=st.dictionaries(
        st.sampled_from(["code", "error_subcode", "message", "error_data", "type"]), _json, max_size=5
    ),
    usage=st.text(max_size=40) | _json.map(json.dumps),
)
def test_classifier_never_raises_on_any_envelope_or_usage_header(status: int, error: Any, usage: str) -> None:
    body = json.dumps({"error": error}).encode()
    headers = {"X-Business-Use-Case-Usage": usage, "X-App-Usage": usage, "Retry-After": usage}

    assert isinstance(classify_meta(status, body, headers), SendResult)


@given(message=_json)
def test_message_check_never_raises(message: Any) -> None:
    problem = whatsapp_message_problem(message)
    assert problem is None or problem.reason


# ----------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+15550001111", TO),
        ("15550001111", TO),
        (" +1 (555) 000-1111 ", TO),
        ("+44 20.7946.0018", "442079460018"),
        ("+4915112345678", "4915112345678"),
        ("+6834002", "6834002"),
        ("+123456789012345", "123456789012345"),
    ],
)
def test_e164_numbers_are_sent_as_digits(raw: str, expected: str) -> None:
    assert WhatsAppProvider.normalize_address(_unbound(), raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("+1 555 CALL NOW", "only digits"),
        ("ada@example.com", "only digits"),
        ("+0155500011", "not with 0"),
        ("020 7946 0018", "not with 0"),
        ("+123456", "7 to 15 digits"),
        ("+1234567890123456", "7 to 15 digits"),
        ("++15550001111", "only digits"),
        ("1555+0001111", "only digits"),
        ("+1555\t0001111", "only digits"),
        ("+\u0661\u0665\u0665\u0665\u0660\u0660\u0660\u0661\u0661\u0661\u0661", "only digits"),
    ],
)
def test_invalid_numbers_are_refused_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        WhatsAppProvider.normalize_address(_unbound(), raw)


@given(
    digits=st.text("0123456789", min_size=6, max_size=14),
    separators=st.lists(st.sampled_from(" -.()"), max_size=5),
)
def test_any_valid_number_survives_separators(digits: str, separators: list[str]) -> None:
    number = "1" + digits
    spaced = "".join(ch + (separators[i] if i < len(separators) else "") for i, ch in enumerate(number))

    assert WhatsAppProvider.normalize_address(_unbound(), "+" + spaced) == number


def _unbound() -> WhatsAppProvider:
    # normalize_address needs no connection; a provider that never sends needs no closing.
    return WhatsAppProvider.__new__(WhatsAppProvider)


# ----------------------------------------------------------------- pre-flight

IMAGE = {"type": "image", "image": {"link": "https://x/a.png"}}


def _template(
    name: Any = "spring_sale", code: Any = "en_US", parameters: list[Any] | None = None
) -> dict[str, Any]:
    template: dict[str, Any] = {"name": name, "language": {"code": code}}
    if parameters is not None:
        template["components"] = [{"type": "body", "parameters": parameters}]
    return {"type": "template", "template": template}


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([TEXT] * 3, None),
        ([_template(parameters=[{"type": "text", "text": "Ada"}])], None),
        ([{"type": "image", "image": {"link": "https://x/a.png"}, "caption": "hi"}], None),
        ([], None),
        (["just a string"], "JSON object"),
        ([{"text": {"body": "no type"}}], "type"),
        ([{"type": "text", "text": {"body": "x"}, "to": "15550002222"}], "'to'"),
        ([{"type": "text", "text": {"body": "x"}, "messaging_product": "sms"}], "messaging_product"),
        ([_template(name="")], "template needs a name"),
        ([_template(code=None)], "language code"),
        ([{"type": "template", "template": {"name": "x"}}], "language code"),
        ([{"type": "image", "image": {"caption": "no media"}}], "link"),
        (
            [
                {
                    "type": "template",
                    "template": {
                        **_template()["template"],
                        "components": [{"type": "header", "parameters": [{"type": "image", "image": {}}]}],
                    },
                }
            ],
            "link",
        ),
        # A blank link came from one recipient's variables: that recipient is skipped; the
        # campaign fails only when every message looked at has it.
        ([{"type": "image", "image": {"link": " "}}, IMAGE], None),
        ([{"type": "image", "image": {"link": ""}}], "all of the first 1"),
        ([{"type": "image", "image": {"link": 5}}, IMAGE], "link"),
        (
            [_template(parameters=[{"type": "text", "text": "a"}])]
            + [
                {
                    "type": "template",
                    "template": {
                        **_template()["template"],
                        "components": [{"type": "button", "sub_type": sub_type, "parameters": []}],
                    },
                }
                for sub_type in (["url"], {"url": 1})
            ],
            "sub_type of template component 1 must be text",
        ),
        ([{"type": "text", "text": {"body": "x" * 4097}}], "over the limit of 4096"),
        ([{"type": "text", "text": {"body": "x" * 4097}}, TEXT], None),
        ([_template(parameters=[{"type": "text", "text": "a\nb"}])], "new line"),
        (
            [_template(parameters=[{"type": "text", "text": "a"}]), _template(parameters=[])],
            "parameter counts differ",
        ),
    ],
)
def test_check_messages(messages: list[Any], reason: str | None) -> None:
    found = WhatsAppProvider.check_messages(_unbound(), messages)

    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found


async def test_exception_quoting_a_url_with_the_token_is_redacted() -> None:
    # An invalid port makes aiohttp raise an error that quotes the whole URL. Nothing left:
    # the sender's fault, not a recipient in doubt. The configuration refuses such a port
    # (test_config); made past it here, as a URL aiohttp refuses for any other reason would be.
    bad_url = f"http://127.0.0.1:99999/v21.0?access_token={TOKEN}"
    config = _config("http://127.0.0.1/v21.0").model_copy(update={"api_base": bad_url})
    async with closing_providers() as made:
        result = await made(WhatsAppProvider("wa", config, connection_limit=1)).send(_delivery())

    assert (result.kind, result.error_code, result.maybe_delivered) == (
        ResultKind.SENDER_FATAL,
        "invalid_request",
        False,
    )
    assert result.error_message is not None
    assert "127.0.0.1:99999" in result.error_message
    assert TOKEN[:20] not in result.error_message


async def test_fake_serves_from_its_own_thread_for_daemon_tests() -> None:
    server = FakeWhatsApp(token=TOKEN, phone_number_id=PHONE_ID)
    server.start_in_thread()
    provider = WhatsAppProvider("wa", _config(server.url), connection_limit=1)
    try:
        server.fail("15550002222", meta_error(131026, "Message undeliverable."))
        sent = await provider.send(_delivery())
        failed = await provider.send(_delivery(address="15550002222"))
    finally:
        await provider.close()
        server.stop_thread()

    assert (sent.kind, failed.kind) == (ResultKind.SENT, ResultKind.RECIPIENT_PERMANENT)
    assert [r.address for r in server.requests] == [TO, "15550002222"]
