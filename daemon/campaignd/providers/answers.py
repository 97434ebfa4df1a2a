"""Pure pieces the classifiers share: reading a body, an id, an error text, a bare status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from campaignd.outcomes import ResultKind, SendResult, parse_retry_after

MAX_MESSAGE_ID_LENGTH = 200
# Provider texts are stored per recipient; the database clips again, this keeps a chatty
# provider (or a proxy's HTML) from costing memory first.
MAX_PROVIDER_TEXT = 300


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or None when it is empty or not JSON."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def text_id(value: Any) -> str | None:
    """A provider's id as text, or None when it is absent, empty or not a scalar."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text[:MAX_MESSAGE_ID_LENGTH] if text else None


def integer_code(value: Any) -> int | None:
    """An error code as an int: providers send ints, proxies and SDKs sometimes digit strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def short_text(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    text = " ".join(value.split())
    return text if len(text) <= MAX_PROVIDER_TEXT else text[: MAX_PROVIDER_TEXT - 1] + "…"


def describe(code: int | str, message: str) -> str:
    """``(#code) message``, the shape of Meta's own texts, for every provider alike."""
    prefix = f"(#{code})"
    if message.startswith(prefix):
        return message
    return f"{prefix} {message}" if message else prefix


def classify_bare_status(status: int, headers: Mapping[str, str]) -> SendResult:
    """An answer without the provider's error envelope: a proxy's page, an empty body.

    Only then does the HTTP status decide, and only for what it says unambiguously: an
    overloaded or unreachable upstream is worth retrying, 429 asks for patience. Anything
    else is unknown: retried a few times, and the circuit breaker watches it.
    """
    code = f"http_{status}"
    message = f"HTTP {status} without the provider's error body"
    if status == 429:
        return SendResult(
            ResultKind.THROTTLED,
            error_code=code,
            error_message=message,
            retry_after_seconds=parse_retry_after(headers.get("Retry-After")),
        )
    if status >= 500 or status == 408 or 300 <= status < 400:
        return SendResult(ResultKind.TRANSIENT, error_code=code, error_message=message)
    return SendResult(ResultKind.UNKNOWN, error_code=code, error_message=message)
