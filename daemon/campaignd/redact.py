"""Keeping secrets out of logs, the database and exception messages."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterable

_URL_QUERY = re.compile(r"(?i)(https?://[^\s?#'\"]+)\?[^\s#'\"]*")
# A URL's user name and password (https://user:pass@host/): what an error message quoting
# the URL would otherwise show.
_URL_USERINFO = re.compile(r"(?i)\b(https?://)[^\s/?#'\"]*@")
# Schemes are case-insensitive; requiring a digit or punctuation in the token spares prose
# such as "basic information".
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}")
REDACTED = "[redacted]"


class Redactor:
    """Removes known secret values, the query strings and credentials of URLs, and bearer
    tokens from text.

    Query strings go because tokens travel there (``?access_token=...``) and an aiohttp
    error message quotes the whole URL.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short values would redact innocent text ("ab" in every word): they are not
        # secrets worth the name, and a bearer prefix still catches them in headers.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _URL_USERINFO.sub(rf"\1{REDACTED}@", _URL_QUERY.sub(rf"\1?{REDACTED}", text))
        return _BEARER.sub(rf"\1 {REDACTED}", text)


def redacted_traceback(exc: BaseException, redact: Callable[[str], str]) -> str:
    """The traceback a log shows for an unexpected error, through ``redact``: its message may
    quote what a provider answered, and a provider may echo a credential back."""
    return redact("".join(traceback.format_exception(exc)).rstrip())
