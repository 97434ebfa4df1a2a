"""Imported at start-up by a daemon under test whose PYTHONPATH names this folder: the third
write of outcomes raises, once, as a bug there would, with sends recorded before it, others
buffered, and claims queued behind them (tests/test_lifecycle.py). Nothing else imports it."""

from collections.abc import Sequence
from typing import Any

from campaignd import dispatch

_original = dispatch.outcome_columns
_calls = 0


def _broken_once(batch: Sequence[Any]) -> Any:
    global _calls
    _calls += 1
    if _calls == 3:
        raise ValueError("a bug planted in the third write of outcomes")
    return _original(batch)


dispatch.outcome_columns = _broken_once
