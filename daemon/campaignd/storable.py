"""Texts from outside the database, made storable in its server encoding.

A provider's error code, message or message id, and the reasons built of them, may hold any
character. A database whose server encoding is not UTF8 (LATIN1, WIN1252, EUC_JP, ...) refuses
a text with a character it cannot hold (SQLSTATE 22P05): written as they came, one such answer
crashed its sender's lane at every outcome write, and the recipient, left in flight, was sent
again by every next owner of the lane. In such a database those texts are stored with what the
encoding cannot hold as Python's backslash escapes (``\\u2713``): lossy, but readable, and
ASCII, which every server encoding holds. UTF8 and SQL_ASCII (which stores any byte as it comes)
need nothing: the lanes then skip all of this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from campaignd.outcomes import ERROR_MESSAGE_LIMIT, OutcomeColumns, RecipientUpdate, SendResult

if TYPE_CHECKING:
    from campaignd.db import Connection

# A text as the database can store it.
StorableText = Callable[[str], str]

# Server encodings whose characters Python's codec knows (but those below): checked against
# PostgreSQL 16's conversions, every code point of the first three planes, written and read
# back (tests/test_server_encodings.py). The others (EUC_KR, EUC_JIS_2004, EUC_TW,
# MULE_INTERNAL, any new one), whose codecs differ more, keep ASCII only.
_CODECS = {
    "LATIN1": "latin-1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_CN": "gb2312",
    "EUC_JP": "euc_jp",
}
# Characters Python's codec maps and PostgreSQL's conversion refuses, or (U+00A6) stores as
# another (U+FFE4): escaped, so that a text reads back as it was written.
_NOT_IN_SERVER_ENCODING = {"EUC_JP": "\u00a2\u00a3\u00a5\u00a6\u00ac\u2016\u203e\u2212\u301c"}
# The longest delay a substitute outcome keeps (see substitutes).
MAX_RETRY_SECONDS = 3600.0
# Encodings that take any text as it is.
_ANY_TEXT = frozenset({"UTF8", "SQL_ASCII"})


def _escape(char: str) -> str:
    """What the codecs' "backslashreplace" makes of a character."""
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def storable_text(server_encoding: str | None) -> StorableText | None:
    """How to make a text storable in a database of this server encoding (as PostgreSQL names
    it, ``SHOW server_encoding``); None when any text is (UTF8, SQL_ASCII). An encoding not
    known (None: the server did not say) keeps ASCII only."""
    name = (server_encoding or "").upper()
    if name in _ANY_TEXT:
        return None
    codec = _CODECS.get(name, "ascii")
    missing = _NOT_IN_SERVER_ENCODING.get(name, "")
    table = {ord(char): _escape(char) for char in missing}

    def storable(text: str) -> str:
        if text.isascii():
            return text
        if table:
            text = text.translate(table)
        # NUL is ASCII and left alone: no encoding holds it, and the providers' answers have
        # it replaced before they get here (providers/transport.py).
        return text.encode(codec, "backslashreplace").decode(codec)

    return storable


def server_encoding(connection: Connection) -> str | None:
    """The database's server encoding, as the server reported it when the session started."""
    value = getattr(connection.get_settings(), "server_encoding", None)
    return value if isinstance(value, str) else None


def ascii_text(text: str) -> str:
    """A text every server encoding holds: ASCII, with no NUL."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return escaped.replace("\x00", "\\x00")


def _optional(storable: StorableText, text: str | None) -> str | None:
    return None if text is None else storable(text)


def storable_message(storable: StorableText, message: str) -> str:
    """An error message as stored, within ERROR_MESSAGE_LIMIT: escapes lengthen a text, and
    one that outcomes.decide() then clipped would end in a character the encoding lacks."""
    if len(message) > ERROR_MESSAGE_LIMIT:
        message = message[:ERROR_MESSAGE_LIMIT] + "…"
    text = storable(message)
    if len(text) <= ERROR_MESSAGE_LIMIT:
        return text
    ellipsis = storable("…")
    return text[: ERROR_MESSAGE_LIMIT - len(ellipsis)] + ellipsis


def storable_result(storable: StorableText, result: SendResult) -> SendResult:
    """A send's result with its texts as they will be stored: decide() compares them with the
    recipient's last error (read back from the database), and pause reasons are made of them."""
    message_id, code, message = result.provider_message_id, result.error_code, result.error_message
    if (
        (message_id is None or message_id.isascii())
        and (code is None or code.isascii())
        and (message is None or (message.isascii() and len(message) <= ERROR_MESSAGE_LIMIT))
    ):
        return result
    return replace(
        result,
        provider_message_id=_optional(storable, message_id),
        error_code=_optional(storable, code),
        error_message=None if message is None else storable_message(storable, message),
    )


def storable_columns(storable: StorableText, columns: OutcomeColumns) -> OutcomeColumns:
    """``record_outcomes``' arrays (outcomes.outcome_columns) with their texts storable."""
    ids, states, message_ids, codes, messages, retry_in, adjustments, claims, maybe_delivered = columns

    def texts(column: list[str | None] | None) -> list[str | None] | None:
        return None if column is None else [_optional(storable, text) for text in column]

    return (
        ids,
        states,
        texts(message_ids),
        texts(codes),
        texts(messages),
        retry_in,
        adjustments,
        claims,
        maybe_delivered,
    )


def _bounded(seconds: float | None) -> float | None:
    if seconds is None or 0.0 <= seconds <= MAX_RETRY_SECONDS:
        return seconds
    # NaN, negative or too far off (an interval out of range is a data error too).
    return MAX_RETRY_SECONDS if seconds > MAX_RETRY_SECONDS else 0.0


def substitutes(update: RecipientUpdate, refused: BaseException) -> list[RecipientUpdate]:
    """What to write instead of an outcome the database refused as data (class 22), in turn:
    its texts in ASCII, then none of its texts (and no delay past what any interval holds).
    Its recipient leaves the in-flight state either way: left there, every next owner of the
    lane would send it again, as in doubt, and meet the same refusal."""
    texts = (update.provider_message_id, update.error_code, update.error_message)
    escaped = tuple(None if text is None else ascii_text(text) for text in texts)
    bare = replace(
        update,
        provider_message_id=None,
        error_code="unstorable_outcome",
        error_message=f"the outcome could not be stored ({type(refused).__name__})",
        retry_in_seconds=_bounded(update.retry_in_seconds),
    )
    if escaped == texts:
        return [bare]
    message_id, code, message = escaped
    return [replace(update, provider_message_id=message_id, error_code=code, error_message=message), bare]
