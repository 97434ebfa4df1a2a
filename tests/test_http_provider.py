"""The generic http provider: classifying answers, normalising addresses, and sending for real."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import unicodedata
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from campaignd.config import HttpSenderConfig
from campaignd.fakeprovider import Behaviour, FakeProvider, Rule
from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers import build_provider
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.providers.http import (
    MAX_ADDRESS_LENGTH,
    HttpProvider,
    classify_http_response,
    normalize_generic_address,
)
from tests.provider_fakes import closing_providers, serve_app

TOKEN = "s3cr3t-token-value"
AUTHORIZATION = f"Bearer {TOKEN}"
MakeProvider = Callable[..., HttpProvider]
CAMPAIGN = "0b5d6a3e-9c1f-4c3e-8c7a-2f1e0d9c8b7a"


def _json(payload: Any) -> bytes:
    return orjson.dumps(payload)


# ----------------------------------------------------------------- classify_http_response()


@pytest.mark.parametrize(
    ("body", "message_id"),
    [
        (_json({"id": "m1"}), "m1"),
        (_json({"id": 5}), "5"),
        (_json({"id": "m2", "status": "queued"}), "m2"),
    ],
)
def test_2xx_with_id_is_sent(body: bytes, message_id: str) -> None:
    assert classify_http_response(200, body, {}) == SendResult(
        ResultKind.SENT, provider_message_id=message_id
    )


def test_201_and_202_with_id_are_sent() -> None:
    assert classify_http_response(201, _json({"id": "a"}), {}).kind is ResultKind.SENT
    assert classify_http_response(202, _json({"id": "b"}), {}).kind is ResultKind.SENT


def test_long_message_id_is_clipped() -> None:
    result = classify_http_response(200, _json({"id": "z" * 1000}), {})

    assert result.provider_message_id == "z" * 200


@pytest.mark.parametrize(
    "body", [_json({}), _json({"id": ""}), _json({"id": None}), _json({"id": True}), _json([1])]
)
def test_2xx_without_usable_id_is_transient_missing_message_id(body: bytes) -> None:
    result = classify_http_response(200, body, {})

    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code == "missing_message_id"
    assert result.provider_message_id is None
    # The provider may have accepted it: resent only where the sender says it deduplicates.
    assert result.maybe_delivered


@pytest.mark.parametrize("body", [b"", b"OK", b"<html>fine</html>", b'{"id": "m1"'])
def test_2xx_with_unparsable_body_is_transient(body: bytes) -> None:
    result = classify_http_response(200, body, {})

    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code == "unparsable_body"
    assert result.maybe_delivered


def test_429_is_throttled_with_retry_after() -> None:
    result = classify_http_response(
        429, _json({"error": {"code": "rate_limited", "message": "slow down"}}), {"Retry-After": "2"}
    )

    assert result.kind is ResultKind.THROTTLED
    assert result.retry_after_seconds == 2.0
    assert result.error_code == "rate_limited"


def test_503_is_throttled_without_retry_after() -> None:
    result = classify_http_response(503, b"", {})

    assert result.kind is ResultKind.THROTTLED
    assert result.retry_after_seconds is None
    assert result.error_code == "http_503"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_sender_fatal(status: int) -> None:
    result = classify_http_response(status, _json({"error": {"code": "unauthorized", "message": "no"}}), {})

    assert result.kind is ResultKind.SENDER_FATAL
    assert result.error_code == "unauthorized"


@pytest.mark.parametrize("status", [408, 500, 502, 504, 599])
def test_timeouts_and_server_errors_are_transient(status: int) -> None:
    result = classify_http_response(status, b"<html>oops</html>", {})

    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code == f"http_{status}"
    assert result.error_message == f"HTTP {status}"
    # A gateway that got no answer (504) or a broken one (502) from the provider cannot say
    # whether the provider took the request; a 500 or a 408 is the provider's own refusal.
    assert result.maybe_delivered is (status in (502, 504))


def test_409_is_a_request_with_this_key_still_in_progress() -> None:
    result = classify_http_response(409, _json({"error": {"code": "idempotency_key_in_use"}}), {})

    assert (result.kind, result.error_code, result.maybe_delivered) == (
        ResultKind.TRANSIENT,
        "idempotency_key_in_use",
        True,
    )


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_transient(status: int) -> None:
    result = classify_http_response(status, b"", {"Location": "https://elsewhere/"})

    assert result.kind is ResultKind.TRANSIENT


def test_400_with_error_object_is_permanent_with_its_code_and_message() -> None:
    result = classify_http_response(400, _json({"error": {"code": "bad_number", "message": "m"}}), {})

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert result.error_code == "bad_number"
    assert result.error_message is not None
    assert "m" in result.error_message
    assert result.error_message == "HTTP 400: m"


@pytest.mark.parametrize("body", [b"", b"<html>Not Found</html>", _json({"error": "flat string"})])
def test_404_without_error_object_is_permanent_http_404(body: bytes) -> None:
    result = classify_http_response(404, body, {})

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert result.error_code == "http_404"
    assert result.error_message == "HTTP 404"


def test_integer_error_code_becomes_string() -> None:
    result = classify_http_response(422, _json({"error": {"code": 21211, "message": "invalid"}}), {})

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert result.error_code == "21211"


def test_boolean_error_code_is_ignored() -> None:
    assert classify_http_response(400, _json({"error": {"code": True}}), {}).error_code == "http_400"


# ----------------------------------------------------------------- normalize_generic_address()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("+15550001111", "+15550001111"), ("  user@example.com  ", "user@example.com"), (" x", "x")],
)
def test_address_is_stripped_of_spaces(raw: str, expected: str) -> None:
    assert normalize_generic_address(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        *("", "   ", "\n\t", "+1 555 0001", "a\tb", "a\u00a0b", "a\x00b", "a\x1fb", "a\x7fb"),
        # Blanks the duplicate check (address_key: btrim) keeps: stripped, "user@example.com"
        # would be sent once for each of these beside it.
        *("user@example.com\n", "\tuser@example.com", "user@example.com\u00a0", "\u2003user@example.com"),
    ],
)
def test_empty_spaced_or_control_address_is_invalid(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        normalize_generic_address(raw)


def test_address_length_limit() -> None:
    assert normalize_generic_address("a" * MAX_ADDRESS_LENGTH) == "a" * MAX_ADDRESS_LENGTH
    with pytest.raises(InvalidAddress):
        normalize_generic_address("a" * (MAX_ADDRESS_LENGTH + 1))


@given(control=st.characters(categories=["Cc"]))
def test_any_control_character_makes_address_invalid(control: str) -> None:
    assert unicodedata.category(control) == "Cc"
    with pytest.raises(InvalidAddress):
        normalize_generic_address(f"user{control}@example.com")


@given(address=st.text(max_size=40))
def test_address_fast_path_agrees_with_the_whitespace_and_control_rule(address: str) -> None:
    cleaned = address.strip(" ")
    valid = bool(cleaned) and not any(c.isspace() or unicodedata.category(c) == "Cc" for c in cleaned)
    if valid:
        assert normalize_generic_address(address) == cleaned
    else:
        with pytest.raises(InvalidAddress):
            normalize_generic_address(address)


# ----------------------------------------------------------------- HttpProvider.send()


@pytest.fixture
async def fp() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider(Behaviour())
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


def _config(url: str, *, timeout: float = 5.0) -> HttpSenderConfig:
    return HttpSenderConfig(
        url=url, headers={"Authorization": SecretStr(AUTHORIZATION)}, timeout_seconds=timeout
    )


@pytest.fixture
async def make_provider() -> AsyncIterator[MakeProvider]:
    made: list[HttpProvider] = []

    def make(url: str, *, timeout: float = 5.0) -> HttpProvider:
        provider = HttpProvider("sms", _config(url, timeout=timeout), connection_limit=8)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


def _delivery(address: str = "+15550001111", recipient_id: int = 17) -> Delivery:
    return Delivery(CAMPAIGN, recipient_id, address, {"text": "hello Ada", "tags": ["a", 1]})


async def test_send_posts_json_body_idempotency_key_and_configured_headers(
    fp: FakeProvider, make_provider: MakeProvider
) -> None:
    provider = make_provider(fp.url)

    result = await provider.send(_delivery())

    assert result.kind is ResultKind.SENT
    [accepted] = fp.accepted()
    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("fake-")
    assert accepted.key == f"{CAMPAIGN}:17"
    assert accepted.body == {
        "to": "+15550001111",
        "message": {"text": "hello Ada", "tags": ["a", 1]},
        "campaign_id": CAMPAIGN,
        "recipient_id": 17,
    }
    assert fp.last_headers["Idempotency-Key"] == f"{CAMPAIGN}:17"
    assert fp.last_headers["Authorization"] == AUTHORIZATION
    assert fp.last_headers["Content-Type"] == "application/json"


async def test_send_reuses_one_session_for_many_messages(
    fp: FakeProvider, make_provider: MakeProvider
) -> None:
    provider = make_provider(fp.url)

    results = await asyncio.gather(*(provider.send(_delivery(f"+1555{i:07d}", i)) for i in range(20)))

    assert all(r.kind is ResultKind.SENT for r in results)
    assert len({r.provider_message_id for r in results}) == 20
    assert fp.accepted_count() == 20


async def test_resend_with_same_key_gets_first_message_id(
    fp: FakeProvider, make_provider: MakeProvider
) -> None:
    provider = make_provider(fp.url)

    first = await provider.send(_delivery())
    second = await provider.send(_delivery())

    assert second.provider_message_id == first.provider_message_id
    assert fp.accepted_count() == 1


async def test_send_classifies_provider_error(fp: FakeProvider, make_provider: MakeProvider) -> None:
    fp.behaviour.rules["+15550001111"] = Rule(
        429, {"error": {"code": "rate_limited", "message": "slow"}}, headers={"Retry-After": "3"}
    )
    provider = make_provider(fp.url)

    result = await provider.send(_delivery())

    assert result.kind is ResultKind.THROTTLED
    assert result.retry_after_seconds == 3.0
    assert fp.accepted_count() == 0


async def test_send_timeout_is_transient_timeout(fp: FakeProvider, make_provider: MakeProvider) -> None:
    fp.behaviour.rules["+15550001111"] = Rule(200, {"id": "late"}, delay_seconds=5.0)
    provider = make_provider(fp.url, timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    result = await provider.send(_delivery())

    assert loop.time() - started < 4.0
    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code == "timeout"


async def test_send_to_closed_port_is_transient_connection_error(make_provider: MakeProvider) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = make_provider(f"http://127.0.0.1:{port}/send?api_key=querysecret99")

    result = await provider.send(_delivery())

    assert result.kind is ResultKind.TRANSIENT
    assert result.error_code == "connection_error"
    assert result.error_message
    assert "querysecret99" not in result.error_message


async def test_provider_echoing_authorization_header_is_redacted(
    fp: FakeProvider, make_provider: MakeProvider
) -> None:
    fp.behaviour.rules["+15550001111"] = Rule(
        400, {"error": {"code": "bad_auth_format", "message": f"header was '{AUTHORIZATION}'"}}
    )
    provider = make_provider(fp.url)

    result = await provider.send(_delivery())

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert result.error_code == "bad_auth_format"
    assert result.error_message is not None
    assert result.error_message.startswith("HTTP 400: header was")
    assert TOKEN not in result.error_message


async def test_provider_echoing_bare_token_is_redacted(fp: FakeProvider, make_provider: MakeProvider) -> None:
    fp.behaviour.rules["+15550001111"] = Rule(
        400, {"error": {"code": "bad_token", "message": f"token {TOKEN} is not valid"}}
    )
    provider = make_provider(fp.url)

    result = await provider.send(_delivery())

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert result.error_message is not None
    assert TOKEN not in result.error_message


def test_a_key_carried_as_the_urls_user_name_is_a_secret() -> None:
    provider = HttpProvider(
        "sms", HttpSenderConfig(url="https://k3y-abcdef123456@api.example/send"), connection_limit=1
    )

    assert provider.redact("unknown api key k3y-abcdef123456") == "unknown api key [redacted]"


async def test_provider_echoing_the_urls_password_is_redacted(fp: FakeProvider) -> None:
    # A password with a blank is out of the redactor's reach by its URL's shape alone.
    fp.behaviour.rules["+15550001111"] = Rule(
        400, {"error": {"code": "bad_login", "message": "password 'pa ss-S3CRET' (pa%20ss-S3CRET) refused"}}
    )
    url = fp.url.replace("://", "://user:pa%20ss-S3CRET@", 1)
    async with closing_providers() as made:
        result = await made(HttpProvider("sms", HttpSenderConfig(url=url), connection_limit=8)).send(
            _delivery()
        )

    assert result.error_code == "bad_login"
    assert result.error_message == "HTTP 400: password '[redacted]' ([redacted]) refused"


def test_only_credentials_are_redacted_not_the_words_around_them() -> None:
    # Every word of every header was a secret: "Bearer" and "application/json" vanished
    # from every stored error that named them.
    config = HttpSenderConfig(
        url="https://api.example/send",
        headers={
            "Authorization": SecretStr("Bearer tok_0123456789abcdef"),
            "Accept": SecretStr("application/json"),
            "X-Api-Key": SecretStr("key=k3y-0123456; sig=s1g-0123456"),
        },
    )
    provider = HttpProvider("sms", config, connection_limit=1)

    redacted = provider.redact(
        "expected Bearer token, not tok_0123456789abcdef; body must be application/json;"
        " key=k3y-0123456; or sig=s1g-0123456"
    )

    assert redacted == (
        "expected Bearer token, not [redacted]; body must be application/json; [redacted] or [redacted]"
    )


@pytest.fixture
async def chunked_server() -> AsyncIterator[str]:
    """A provider that answers 200 {"id": "m1"} in two chunks, 50 ms apart (legal HTTP/1.1)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(b'{"id":')
            await asyncio.sleep(0.05)
            await response.write(b'"m1"}')
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/send", handler)
    async with serve_app(app) as url:
        yield f"{url}/send"


async def test_body_arriving_in_several_chunks_is_read_whole(
    chunked_server: str, make_provider: MakeProvider
) -> None:
    provider = make_provider(chunked_server)

    result = await provider.send(_delivery())

    assert result == SendResult(ResultKind.SENT, provider_message_id="m1")


async def test_close_is_idempotent_and_session_recreated(fp: FakeProvider) -> None:
    provider = HttpProvider("sms", _config(fp.url), connection_limit=2)
    try:
        assert (await provider.send(_delivery(recipient_id=1))).kind is ResultKind.SENT
        await provider.close()
        await provider.close()
        assert (await provider.send(_delivery(recipient_id=2))).kind is ResultKind.SENT
    finally:
        await provider.close()
    assert fp.accepted_count() == 2


async def test_build_provider_makes_http_provider(fp: FakeProvider) -> None:
    provider = build_provider("sms", _config(fp.url), connection_limit=4)
    try:
        assert isinstance(provider, HttpProvider)
        assert provider.sender_id == "sms"
        assert provider.resend_in_doubt is True
        assert provider.normalize_address("  +1555 ") == "+1555"
    finally:
        await provider.close()
