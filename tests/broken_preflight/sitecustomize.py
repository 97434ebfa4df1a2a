"""Imported at start-up by a daemon under test whose PYTHONPATH names this folder: the http
provider's pre-flight check raises for messages that ask it to, as a bug in a provider's
checks might (tests/test_reactions.py). Nothing else imports it."""

from collections.abc import Sequence
from typing import Any

from campaignd.providers.http import HttpProvider

_checked = HttpProvider.check_messages


def _broken(self: HttpProvider, messages: Sequence[Any]) -> str | None:
    if any(isinstance(message, dict) and "break the pre-flight" in message for message in messages):
        raise TypeError("a bug in the pre-flight")
    return _checked(self, messages)


HttpProvider.check_messages = _broken  # type: ignore[method-assign]
