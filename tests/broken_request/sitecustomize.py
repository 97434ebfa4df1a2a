"""Imported at start-up by a daemon under test whose PYTHONPATH names this folder: the http
provider cannot encode a request body, as a bug building a request might
(tests/test_reactions.py). Nothing else imports it."""

from types import SimpleNamespace
from typing import Any

from campaignd.providers import http


def _broken(value: Any) -> bytes:
    raise TypeError("a bug while building the request")


http.orjson = SimpleNamespace(dumps=_broken, loads=http.orjson.loads)  # type: ignore[assignment]
