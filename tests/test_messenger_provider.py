"""The Messenger / Instagram Send API adapter, through a local fake that speaks the real API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from campaignd.config import MessengerSenderConfig
from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers import build_provider
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.providers.messenger import MessengerProvider, send_api_message_problem
from tests.provider_fakes import FakeMessenger, closing_providers, meta_error, served

TOKEN = "EAAJmessengerPAGEtoken0987654321abcdef"
PAGE_ID = "104758932459301"
CAMPAIGN = "5c1e7a8e-1d2b-4c3e-9f7a-2f1e0d9c8b7a"
PSID = "6254477777772919"
MESSAGE = {"message": {"text": "Hi Ada"}}
MakeProvider = Callable[..., MessengerProvider]
K = ResultKind


@pytest.fixture
async def fake() -> AsyncIterator[FakeMessenger]:
    async with served(FakeMessenger(token=TOKEN, page_id=PAGE_ID)) as server:
        yield server


def _config(api_base: str, **overrides: Any) -> MessengerSenderConfig:
    fields: dict[str, Any] = {
        "provider": "messenger",
        "page_id": PAGE_ID,
        "access_token": SecretStr(TOKEN),
        "api_base": api_base,
    }
    return MessengerSenderConfig(**(fields | overrides))


@pytest.fixture
async def make_provider(fake: FakeMessenger) -> AsyncIterator[MakeProvider]:
    async with closing_providers() as made:
        yield lambda **overrides: made(
            MessengerProvider("fb", _config(fake.url, **overrides), connection_limit=4)
        )


def _delivery(message: Any = MESSAGE, address: str = PSID) -> Delivery:
    return Delivery(CAMPAIGN, 5, address, message)


# ----------------------------------------------------------------- the request


async def test_request_is_the_send_api_request_with_config_defaults(
    fake: FakeMessenger, make_provider: MakeProvider
) -> None:
    result = await make_provider().send(_delivery())

    [request] = fake.requests
    assert request.path == f"/v21.0/{PAGE_ID}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.query == {}
    assert request.json == {
        "recipient": {"id": PSID},
        "messaging_type": "UPDATE",
        "message": {"text": "Hi Ada"},
    }
    [sent] = fake.sent
    assert result == SendResult(ResultKind.SENT, provider_message_id=sent.message_id)


async def test_config_tag_goes_with_message_tag_and_message_fields_win(
    fake: FakeMessenger, make_provider: MakeProvider
) -> None:
    provider = make_provider(page_id="me", messaging_type="MESSAGE_TAG", tag="ACCOUNT_UPDATE")

    await provider.send(_delivery())
    await provider.send(
        _delivery({**MESSAGE, "messaging_type": "RESPONSE", "notification_type": "SILENT_PUSH"})
    )
    await provider.send(_delivery({**MESSAGE, "tag": "POST_PURCHASE_UPDATE"}))

    first, second, third = (r.json for r in fake.requests)
    assert fake.requests[0].path == "/v21.0/me/messages"
    assert (first["messaging_type"], first["tag"]) == ("MESSAGE_TAG", "ACCOUNT_UPDATE")
    assert second == {
        "recipient": {"id": PSID},
        "messaging_type": "RESPONSE",
        "message": {"text": "Hi Ada"},
        "notification_type": "SILENT_PUSH",
    }
    assert third["tag"] == "POST_PURCHASE_UPDATE"
    assert len(fake.sent) == 3


async def test_build_provider_names_instagram_from_config(fake: FakeMessenger) -> None:
    provider = build_provider("ig", _config(fake.url, provider="instagram"), connection_limit=2)
    try:
        assert isinstance(provider, MessengerProvider)
        assert (provider.name, provider.resend_in_doubt) == ("instagram", False)
        with pytest.raises(InvalidAddress, match="Instagram-scoped id"):
            provider.normalize_address("ada@example.com")
    finally:
        await provider.close()


# ----------------------------------------------------------------- codes, through the fake


@pytest.mark.parametrize(
    ("code", "subcode", "kind", "recorded"),
    [
        (551, 1545041, K.RECIPIENT_PERMANENT, "1545041"),
        (551, None, K.RECIPIENT_PERMANENT, "551"),
        (10, 2018278, K.RECIPIENT_PERMANENT, "2018278"),
        # Outside the messaging window, or the person does not take the page's messages:
        # this person only, never the whole sender (code 10 alone would pause it).
        (10, 2018065, K.RECIPIENT_PERMANENT, "2018065"),
        (10, 2534022, K.RECIPIENT_PERMANENT, "2534022"),
        (10, 2018108, K.RECIPIENT_PERMANENT, "2018108"),
        (102, None, K.SENDER_FATAL, "102"),
        (341, None, K.THROTTLED, "341"),
        (100, 2018001, K.RECIPIENT_PERMANENT, "2018001"),
        (100, 2018109, K.CAMPAIGN_FATAL, "2018109"),
        (2018278, None, K.RECIPIENT_PERMANENT, "2018278"),
        (2018001, None, K.RECIPIENT_PERMANENT, "2018001"),
        (2018109, None, K.CAMPAIGN_FATAL, "2018109"),
        (1200, None, K.TRANSIENT, "1200"),
        (2, None, K.TRANSIENT, "2"),
        (10, None, K.SENDER_FATAL, "10"),
        (190, 463, K.SENDER_FATAL, "463"),
        (190, 460, K.SENDER_FATAL, "190"),
        (200, 2018028, K.SENDER_FATAL, "200"),
        (368, None, K.SENDER_FATAL, "368"),
        (100, 33, K.SENDER_FATAL, "33"),
        (613, None, K.THROTTLED, "613"),
        (32, None, K.THROTTLED, "32"),
        (80006, None, K.THROTTLED, "80006"),
        (80002, None, K.THROTTLED, "80002"),
        (9999999, None, K.UNKNOWN, "9999999"),
    ],
)
async def test_send_api_codes_through_the_real_envelope(
    fake: FakeMessenger,
    make_provider: MakeProvider,
    code: int,
    subcode: int | None,
    kind: ResultKind,
    recorded: str,
) -> None:
    fake.fail(PSID, meta_error(code, "Some title", subcode=subcode, status=500 if code == 1200 else 400))

    result = await make_provider().send(_delivery())

    assert (result.kind, result.error_code) == (kind, recorded)
    assert result.error_message == f"(#{code}) Some title"


async def test_page_usage_header_sets_the_wait(fake: FakeMessenger, make_provider: MakeProvider) -> None:
    usage = '{"call_count": 100, "total_cputime": 30, "total_time": 40, "estimated_time_to_regain_access": 4}'
    fake.fail(PSID, meta_error(32, "Page request limit reached", headers={"X-Page-Usage": usage}))

    result = await make_provider().send(_delivery())

    assert (result.kind, result.retry_after_seconds) == (ResultKind.THROTTLED, 240.0)


async def test_token_echoed_back_is_redacted(fake: FakeMessenger, make_provider: MakeProvider) -> None:
    fake.fail(PSID, meta_error(190, f"Error validating access token: {TOKEN} has expired", status=401))

    result = await make_provider().send(_delivery())

    assert result.kind is ResultKind.SENDER_FATAL
    assert result.error_message is not None
    assert TOKEN[:15] not in result.error_message


async def test_invalid_message_is_skipped_without_a_request(
    fake: FakeMessenger, make_provider: MakeProvider
) -> None:
    result = await make_provider(provider="instagram").send(_delivery({"message": {"text": "é" * 501}}))

    assert (result.kind, result.error_code) == (ResultKind.SKIPPED, "invalid_message")
    assert "1002 bytes" in (result.error_message or "")
    assert fake.requests == []


# ----------------------------------------------------------------- addresses


@pytest.mark.parametrize(("raw", "expected"), [(PSID, PSID), (f"  {PSID} ", PSID), ("1", "1")])
def test_scoped_ids_are_digits(raw: str, expected: str) -> None:
    assert _unbound("messenger").normalize_address(raw) == expected


@pytest.mark.parametrize("raw", [f"{PSID}\n", f"\t{PSID}", f"{PSID}\u00a0", f"\u2003{PSID}"])
def test_scoped_ids_with_blanks_the_duplicate_check_keeps_are_invalid(raw: str) -> None:
    # address_key keys a PSID as btrim(address), spaces only: stripped of these too, the id
    # would be sent once for each spelling beside the plain one.
    with pytest.raises(InvalidAddress):
        _unbound("messenger").normalize_address(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("+1 555 000 1111", "a phone number"),
        ("ada@example.com", "an e-mail address"),
        ("Ada Lovelace", "free text"),
        ("1" * 31, "longer than 30"),
        ("62544-77777", "a phone number"),
    ],
)
def test_non_numeric_ids_are_refused_saying_what_they_look_like(raw: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        _unbound("messenger").normalize_address(raw)


def _unbound(name: str) -> MessengerProvider:
    provider = MessengerProvider.__new__(MessengerProvider)
    provider.name = name
    return provider


# ----------------------------------------------------------------- pre-flight


@pytest.mark.parametrize(
    ("provider", "default_type", "default_tag", "messages", "reason"),
    [
        ("messenger", "UPDATE", None, [MESSAGE], None),
        (
            "messenger",
            "UPDATE",
            None,
            [{"message": {"attachment": {"type": "image", "payload": {"url": "https://x"}}}}],
            None,
        ),
        ("messenger", "MESSAGE_TAG", "ACCOUNT_UPDATE", [MESSAGE], None),
        ("messenger", "UPDATE", None, [{**MESSAGE, "messaging_type": "MESSAGE_TAG"}], 'needs a "tag"'),
        (
            "messenger",
            "UPDATE",
            None,
            [{**MESSAGE, "messaging_type": "MESSAGE_TAG", "tag": "NOPE"}],
            "not 'NOPE'",
        ),
        ("instagram", "MESSAGE_TAG", "ACCOUNT_UPDATE", [MESSAGE], "HUMAN_AGENT"),
        ("messenger", "UPDATE", None, [{**MESSAGE, "messaging_type": "PROMO"}], "messaging_type"),
        ("messenger", "UPDATE", None, [{"text": "Hi"}], "unknown field 'text'"),
        ("messenger", "UPDATE", None, [{**MESSAGE, "recipient": {"id": "1"}}], "'recipient'"),
        ("messenger", "UPDATE", None, [[1, 2]], "JSON object"),
        ("messenger", "UPDATE", None, [{"message": {}}], "exactly one"),
        ("messenger", "UPDATE", None, [{"message": {"text": "a", "attachment": {}}}], "exactly one"),
        ("messenger", "UPDATE", None, [{"message": {"attachment": {"type": "gif"}}}], "payload"),
        ("messenger", "UPDATE", None, [{"message": {"text": "x" * 2001}}], "over the limit of 2000"),
        ("messenger", "UPDATE", None, [{"message": {"text": "x" * 2000}}], None),
        ("instagram", "UPDATE", None, [{"message": {"text": "x" * 1001}}], "over the limit of 1000"),
        ("messenger", "UPDATE", None, [{**MESSAGE, "notification_type": "LOUD"}], "notification_type"),
    ],
)
def test_check_messages(
    provider: str, default_type: str, default_tag: str | None, messages: list[Any], reason: str | None
) -> None:
    checker = _unbound(provider)
    checker._messaging_type, checker._tag = default_type, default_tag

    found = checker.check_messages(messages)

    assert found is None if reason is None else reason in (found or "")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["message", "text", "attachment", "type", "payload", "messaging_type", "tag", "x"]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=15,
)


@given(message=_json, provider=st.sampled_from(["messenger", "instagram"]))
def test_message_check_never_raises(message: Any, provider: str) -> None:
    problem = send_api_message_problem(message, provider, "MESSAGE_TAG", "HUMAN_AGENT")
    assert problem is None or problem.reason
