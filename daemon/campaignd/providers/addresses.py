"""Address rules of the real providers: E.164 phone numbers and Meta's page-scoped ids.

A bad address is found here, before any request, and the recipient ends ``skipped`` with
``invalid_address`` and the reason below.
"""

from __future__ import annotations

import re

from campaignd.providers.base import InvalidAddress

# What people and spreadsheets put between digits: "+1 (555) 000-1111", "+44 20.7946.0018".
_SEPARATORS = re.compile(r"[ \u00a0\-.()/]")
# The blanks around a phone number that campaignd.address_key (schema 11) removes too: the
# send path must join no two addresses that the duplicate check keeps apart, or one person is
# sent a message for each. str.strip() would also drop Unicode blanks (U+2003, U+3000, U+001C,
# ...), which the key keeps: "+15550001111\u2003" was sent to the number of "+15550001111".
ASCII_BLANKS = " \t\n\r\f\v"
_DIGITS = re.compile(r"[0-9]+")
# E.164 allows 15 digits at most, country code included; the shortest numbers in use
# (small countries' subscriber numbers with their code) have 7.
E164_MIN_DIGITS = 7
E164_MAX_DIGITS = 15
MAX_SCOPED_ID_DIGITS = 30


def normalize_e164(address: str) -> str:
    """``+`` and the digits of an international number, or raise InvalidAddress.

    The leading ``+`` may be omitted (WhatsApp's own API accepts bare digits), but the
    number must then still start with its country code: a national number ("020 7946 0018")
    cannot be told apart from a foreign one, so a leading 0 is refused rather than guessed.
    """
    text = address.strip(ASCII_BLANKS)
    if not text:
        raise InvalidAddress("phone number is empty")
    if len(text) > 64:
        raise InvalidAddress("phone number is longer than 64 characters")
    has_plus = text.startswith("+")
    digits = _SEPARATORS.sub("", text[1:] if has_plus else text)
    if not _DIGITS.fullmatch(digits):
        raise InvalidAddress(
            "phone number may contain only digits, a leading +, spaces, dashes, dots and parentheses"
        )
    if digits.startswith("0"):
        raise InvalidAddress(
            "phone number must be international, starting with its country code (E.164), not with 0"
        )
    if not E164_MIN_DIGITS <= len(digits) <= E164_MAX_DIGITS:
        raise InvalidAddress(
            f"phone number must have {E164_MIN_DIGITS} to {E164_MAX_DIGITS} digits (E.164), not {len(digits)}"
        )
    return "+" + digits


def normalize_scoped_id(address: str, what: str) -> str:
    """A page-scoped id (PSID, IGSID): digits only, as Meta issues them."""
    # Spaces only: address_key keys these as btrim(address), which trims nothing else.
    text = address.strip(" ")
    if not text:
        raise InvalidAddress(f"{what} is empty")
    if not _DIGITS.fullmatch(text):
        raise InvalidAddress(
            f"{what} must be the numeric id Meta gives a user of the page, not {_kind(text)}"
        )
    if len(text) > MAX_SCOPED_ID_DIGITS:
        raise InvalidAddress(f"{what} is longer than {MAX_SCOPED_ID_DIGITS} digits")
    return text


def _kind(text: str) -> str:
    """What the host seems to have stored instead, so the reason helps fix the data."""
    if "@" in text:
        return "an e-mail address"
    if text.startswith("+") or _SEPARATORS.sub("", text).isdigit():
        return "a phone number"
    return "free text"
