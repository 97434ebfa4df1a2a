"""Imported at start-up by a daemon under test whose PYTHONPATH names this folder: the daemon
takes every server encoding for one that holds any text, as if its table of encodings had
missed a character the server lacks, and so writes the provider's texts as they came
(tests/test_server_encodings.py). Nothing else imports it."""

from typing import Any

from campaignd import storable


def _holds_anything(server_encoding: Any) -> None:
    return None


storable.storable_text = _holds_anything
