"""Keeping secrets out of logs and stored error messages."""

from __future__ import annotations

import pytest

from campaignd.config import HttpSenderConfig
from campaignd.providers.http import HttpProvider
from campaignd.redact import REDACTED, Redactor, redacted_traceback


def test_secret_value_is_removed_wherever_it_appears() -> None:
    redact = Redactor(["tok-123456"])

    text = redact("start tok-123456 middle:tok-123456,end=tok-123456")

    assert "tok-123456" not in text
    assert text == f"start {REDACTED} middle:{REDACTED},end={REDACTED}"


def test_several_secrets_are_all_removed_longest_first() -> None:
    redact = Redactor(["secret1", "secret1-longer-value", "other-secret"])

    text = redact("a=secret1-longer-value b=secret1 c=other-secret")

    assert "secret1" not in text
    assert "longer-value" not in text
    assert "other-secret" not in text


def test_secret_with_regex_characters_is_removed_literally() -> None:
    redact = Redactor(["a.b*c+(d)?"])

    assert redact("x a.b*c+(d)? y axbbbccd y") == f"x {REDACTED} y axbbbccd y"


def test_text_without_secrets_is_unchanged() -> None:
    redact = Redactor(["tok-123456"])

    assert redact("HTTP 500: provider exploded") == "HTTP 500: provider exploded"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://x/y?access_token=abc", "abc"),
        ("http://api.example.com/v1/send?key=zz9plural&x=1", "zz9plural"),
        ("https://h:8443/p?sig=QWERTY#frag", "QWERTY"),
    ],
)
def test_url_query_string_is_replaced(url: str, secret: str) -> None:
    text = Redactor()(f"Cannot connect to {url} (refused)")

    assert secret not in text
    assert url.split("?")[0] + "?" + REDACTED in text
    assert text.endswith(" (refused)")


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://user:S3\\CRET@127.0.0.1:1/x", "http://[redacted]@127.0.0.1:1/x"),
        ("HTTPS://u:p%40ss@api.example/v1?k=v", "HTTPS://[redacted]@api.example/v1?[redacted]"),
        ("https://token@host/", "https://[redacted]@host/"),
    ],
)
def test_a_urls_user_name_and_password_are_replaced(url: str, kept: str) -> None:
    # An error message quoting a URL aiohttp refused showed its password.
    assert Redactor()(f"InvalidUrlClientError: {url} (refused)") == f"InvalidUrlClientError: {kept} (refused)"


def test_an_at_sign_after_a_urls_host_is_kept() -> None:
    text = "see https://api.example/v1/users/@me and mail ops@example.com"

    assert Redactor()(text) == text


def test_url_without_query_is_kept() -> None:
    text = "error at https://api.example.com/v1/send"

    assert Redactor()(text) == text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "Basic", "basic"])
def test_authorization_tokens_are_redacted(scheme: str) -> None:
    text = Redactor()(f"header Authorization: {scheme} xyz.abc-123_~+/= rejected")

    assert "xyz" not in text
    assert "abc-123" not in text
    assert f"{scheme} {REDACTED}" in text
    assert text.endswith(" rejected")


def test_short_secrets_are_not_replaced_in_innocent_text() -> None:
    redact = Redactor(["ab", "12345"])

    text = "about 123456 abstract tables"

    assert redact(text) == text


def test_secret_of_six_characters_is_redacted() -> None:
    assert Redactor(["abcdef"])("xxabcdefxx") == f"xx{REDACTED}xx"


def test_redactor_accepts_any_iterable_once() -> None:
    redact = Redactor(value for value in ["generated-secret"])

    assert redact("generated-secret") == REDACTED
    assert redact("again generated-secret") == f"again {REDACTED}"


def test_a_bugs_traceback_keeps_its_frames_and_loses_the_credentials_it_quotes() -> None:
    # What a send worker logs for a bug in the send path: the message may quote a provider's
    # answer, which may echo the sender's token back.
    config = HttpSenderConfig(
        url="https://api.example.com/send", headers={"Authorization": "Bearer tok-123456"}
    )
    provider = HttpProvider("sms", config, connection_limit=1)

    def classify_answer() -> None:
        raise KeyError("unexpected answer: {'token': 'tok-123456'}")

    try:
        classify_answer()
    except KeyError as exc:
        text = redacted_traceback(exc, provider.redact)

    assert "tok-123456" not in text
    assert REDACTED in text
    assert "in classify_answer" in text and "KeyError" in text
