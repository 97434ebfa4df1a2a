"""Imported at start-up by a daemon under test whose PYTHONPATH names this folder: the http
provider's classifier raises, quoting the sender's token as a bug reading an answer might
(tests/test_secrets.py). Nothing else imports it."""

import os
from collections.abc import Mapping

from campaignd.outcomes import SendResult
from campaignd.providers import http


def _broken(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    raise ValueError(f"cannot read {body[:20]!r}, sent with {os.environ['QUOTED_TOKEN']}")


http.classify_http_response = _broken
