"""``campaignd campaign create``: a campaign and its recipients from a JSON message and a CSV file.

The CSV has a header row; its ``address`` column is the recipient's address and every other
column a variable (``recipients.variables``, a JSON object of strings). Recipients stream
from the file into PostgreSQL through binary COPY, a buffer at a time, so a file of millions
of rows costs no more memory than a small one. The campaign row, its recipients and (with
``--start``) its start are one transaction: an error, a rejected file or a killed process
leaves nothing behind.

Decisions are pure functions (:func:`parse_header`, :func:`row_problem`, :func:`span_problem`,
:func:`recipient`, :func:`check_placeholders`, :func:`message_problem`, :func:`campaign_name`);
the file and the database are thin layers around them.

Every data line of the file is accounted for: it is part of a loaded record, a blank line, or
part of a bad row, reported with its whole line range. A quote that is opened and never
properly closed makes the csv module read the lines after it as one field; those lines are
reported as one bad row spanning all of them, never dropped unnoticed.

Exit codes: 0 created; 1 the database refused or is unreachable (unknown sender, schema not
migrated); 2 the input is wrong (message file, CSV header, bad rows with ``--on-bad-row
reject``, no recipient at all, a ``--name`` or ``--sender`` that is not UTF-8).
"""

from __future__ import annotations

import csv
import json
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from campaignd.providers.addresses import normalize_e164
from campaignd.providers.base import InvalidAddress
from campaignd.providers.http import MAX_ADDRESS_LENGTH
from campaignd.render import MAX_VARIABLE_LENGTH, Template, TemplateError
from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.config import Settings
    from campaignd.db import Connection

ADDRESS_COLUMN: Final = "address"
# Bad rows printed one by one; the rest are only counted, so a wholly broken file of a
# million rows does not bury the summary.
MAX_REPORTED_BAD_ROWS: Final = 20

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INPUT: Final = 2

BadRowPolicy = Literal["skip", "reject"]

# PostgreSQL text and jsonb cannot hold NUL; lone surrogates are what undecodable bytes become
# under errors="surrogateescape" (strict UTF-8 never produces them otherwise).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# The line ends the csv module counts (the file is read with newline=""): an embedded one in a
# quoted field is a physical line of the file.
_LINE_BREAK = re.compile("\r\n|\r|\n")
# A phone number as one token: digits and the punctuation that groups them ("+1-555-000.1111").
# Written with spaces ("+44 20 7946 0018"), a number is told from prose by normalize_e164.
_PHONE_LIKE = re.compile(r"\+?[0-9][0-9().-]*")
# The integers orjson reads as integers (int64 and uint64): it reads a wider one as the nearest
# double, and the database codecs and the provider requests go through orjson too, so a wider
# integer cannot be kept exactly anywhere.
_EXACT_INTEGERS: Final = range(-(2**63), 2**64)
# Every integer outside _EXACT_INTEGERS has 19 digits or more; a message without such a run of
# digits is not parsed a second time.
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{19}")
# How much of a suspicious line a bad-row reason quotes.
_QUOTED_TEXT_LIMIT: Final = 60


class InputError(Exception):
    """The input files are wrong; the message names the file and the problem (exit 2)."""


class DatabaseRefusal(Exception):
    """The database cannot take the campaign as asked (unknown sender); exit 1."""


# ----------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Header:
    names: tuple[str, ...]
    address_index: int

    @property
    def width(self) -> int:
        return len(self.names)

    @cached_property
    def variable_names(self) -> tuple[str, ...]:
        return self.names[: self.address_index] + self.names[self.address_index + 1 :]


def parse_header(fields: Sequence[str]) -> Header:
    """The header row's columns; raises ValueError saying what is wrong with it."""
    names = tuple(name.strip() for name in fields)
    for position, name in enumerate(names, start=1):
        if not name:
            raise ValueError(f"column {position} of the header has no name")
        if _UNSTORABLE.search(name):
            raise ValueError(f"column {position} of the header holds a NUL byte or bytes that are not UTF-8")
    # Spreadsheets capitalise headers; variables keep their case, templates are case-sensitive.
    address = [i for i, name in enumerate(names) if name.lower() == ADDRESS_COLUMN]
    if not address:
        raise ValueError(f"the header has no {ADDRESS_COLUMN!r} column (columns: {', '.join(names)})")
    if len(address) > 1:
        raise ValueError(f"the header has {len(address)} {ADDRESS_COLUMN!r} columns")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"the header names column {name!r} twice")
        seen.add(name)
    return Header(names, address[0])


def row_problem(fields: Sequence[str], header: Header) -> str | None:
    """Why a record cannot become a recipient; None when it can.

    An empty address (or one of spaces) is not a problem here: the daemon skips such a
    recipient as ``no_address``, which is where the campaign's report shows it.
    """
    if len(fields) != header.width:
        return f"{len(fields)} field{'' if len(fields) == 1 else 's'}, the header has {header.width}"
    # One search over the whole row: the per-column search that names the column is for the
    # rare bad row only (this runs a million times for a million-row file).
    if _UNSTORABLE.search("".join(fields)) is not None:
        for name, value in zip(header.names, fields, strict=True):
            found = _UNSTORABLE.search(value)
            if found is not None:
                what = "a NUL byte" if found.group() == "\x00" else "bytes that are not UTF-8"
                return f"column {name!r} holds {what}"
    address = fields[header.address_index]
    if len(address) > MAX_ADDRESS_LENGTH and len(address.strip()) > MAX_ADDRESS_LENGTH:
        return f"the address is {len(address.strip())} characters long, more than {MAX_ADDRESS_LENGTH}"
    if max(map(len, fields)) > MAX_VARIABLE_LENGTH:
        for name, value in zip(header.names, fields, strict=True):
            if len(value) > MAX_VARIABLE_LENGTH:
                return f"column {name!r} is {len(value)} characters long, more than {MAX_VARIABLE_LENGTH}"
    return None


def address_kind(text: str) -> str | None:
    """A coarse class of what an address looks like (email, phone, other token), or None when
    ``text`` cannot be an address at all (empty, too long, or with whitespace inside that is not
    a phone number's grouping)."""
    cell = text.strip()
    if not cell or len(cell) > MAX_ADDRESS_LENGTH:
        return None
    if len(cell.split()) != 1:
        # Prose is spaced digits too ("1 200, 3 400", "020 7946 0018, ask for reception"), and a
        # line of a note taken for a swallowed row would drop its record. Only what the send
        # path takes for an international number ("+44 20 7946 0018") counts as one.
        return "phone" if cell.startswith("+") and _is_international_number(cell) else None
    if "@" in cell:
        return "email"
    return "phone" if _PHONE_LIKE.fullmatch(cell) else "token"


def _is_international_number(text: str) -> bool:
    try:
        normalize_e164(text)
    except InvalidAddress:
        return False
    return True


def span_problem(fields: Sequence[str], header: Header, first_line: int) -> str | None:
    """Why a record that runs over several physical lines is not one recipient; None when it
    is one whose variables hold line breaks.

    Variables legitimately hold line breaks (a multi-line offer, an address block), so a
    record over several lines is not bad in itself. What a stray quote does is different: the
    quoted field it opens swallows the following lines verbatim until some later quote closes
    it, and the record can still have the header's number of fields. Those swallowed lines are
    rows of the file: they start with cells up to an address like this record's own (same kind:
    phone, email or token). A line inside a field that reads like that is taken as a swallowed
    row. When this record's own address is no guide (empty, or not like any address), a line
    is taken as a row when it has exactly the header's number of cells with a phone number or
    an email in the address column. The test errs towards reporting: a false alarm is a row
    the operator is told about, while a miss would load several recipients as one and lose the
    others silently.
    """
    address = fields[header.address_index]
    if _LINE_BREAK.search(address) is not None:
        # No address holds a line break (providers refuse whitespace in one), so the quote that
        # took the address over several lines was not closed on its line.
        return "the address runs over several lines: a quote in this record is not closed on its line"
    kind = address_kind(address)
    line = first_line
    for column, value in enumerate(fields):
        pieces = _LINE_BREAK.split(value)
        if len(pieces) == 1:
            continue
        last = len(pieces) - 1
        for index, piece in enumerate(pieces):
            # A field's first piece is the rest of the line its quote opened on, from its own
            # column (a quote opened before the address column swallows that line's address);
            # every later piece is a whole line, the last one followed on its line by the
            # record's fields after this one.
            start = column if index == 0 else 0
            after = len(fields) - column - 1 if index == last else 0
            if _reads_like_a_row(piece, start, after, header, kind):
                shown = piece if len(piece) <= _QUOTED_TEXT_LIMIT else piece[:_QUOTED_TEXT_LIMIT] + "…"
                return (
                    f"line {line + index} inside column {header.names[column]!r} reads like a row of its "
                    f"own ({shown!r}): a quote in this record probably opened by mistake and swallowed "
                    "the lines after it"
                )
        line += len(pieces) - 1
    return None


def _reads_like_a_row(text: str, start: int, after: int, header: Header, kind: str | None) -> bool:
    """Whether ``text``, cut at commas, taken to begin at column ``start`` and followed on its
    line by ``after`` more fields, reads like a row: an address of ``kind`` in the address
    column. A swallowed line has no quotes left in it (the first one would have ended the
    field), so a plain split is how the csv module would have cut it.

    Without a kind to match (the record's own address is no guide), only a row of exactly the
    header's width with a phone number or an email there: the stricter test keeps text with a
    comma or two from passing for a row."""
    cells = text.split(",")
    position = header.address_index - start
    if not 0 <= position < len(cells):
        return False
    if kind is None:
        width_fits = start + len(cells) + after == header.width
        return width_fits and address_kind(cells[position]) in ("phone", "email")
    # At least one comma: a lone word on a line is text, not a row (the header has other columns
    # whenever a variable can swallow anything).
    if len(cells) < 2 or len(cells) > header.width - start:
        return False
    return address_kind(cells[position]) == kind


def recipient(fields: Sequence[str], header: Header) -> tuple[str | None, dict[str, str]]:
    """(address, variables) of a valid record. CSV cannot tell an empty cell from a missing
    one: an empty address is stored as NULL, an empty variable as the empty string."""
    values = list(fields)
    address = values.pop(header.address_index)
    # Lengths were checked by row_problem; strict=True would check them again per row.
    return address or None, dict(zip(header.variable_names, values))  # noqa: B905


def check_placeholders(template: Template, header: Header, recipients_file: Path) -> None:
    """Every placeholder needs a variable column, or every recipient would be skipped as
    missing_variable.

    The address column is not one: the daemon fills placeholders from ``recipients.variables``
    alone, and the address is stored apart from them, so ``{{address}}`` would skip them all too.
    """
    missing = sorted(template.variables - set(header.variable_names))
    if not missing:
        return
    problems = []
    # The address column is found case-insensitively, so {{Address}} means it as much.
    addresses = [m for m in missing if m.lower() == ADDRESS_COLUMN]
    if addresses:
        problems.append(
            f"the message uses {', '.join('{{' + m + '}}' for m in addresses)}, which the daemon cannot "
            f"fill: the {header.names[header.address_index]!r} column is where each message is sent, not "
            "a variable of the message, and every recipient would be skipped as missing_variable (to "
            "show the address in the message, copy it into a column of another name)"
        )
    others = [m for m in missing if m.lower() != ADDRESS_COLUMN]
    if others:
        problems.append(
            f"the message uses {', '.join('{{' + m + '}}' for m in others)} but the CSV has no such "
            f"column (variable columns: {', '.join(header.variable_names) or 'none'})"
        )
    raise InputError(f"{recipients_file}: {'; '.join(problems)}")


class _InexactInteger(int):
    """An integer of the message that orjson would not keep exactly (see _EXACT_INTEGERS)."""


def _exact_integer(literal: str) -> int:
    value = int(literal)
    return value if value in _EXACT_INTEGERS else _InexactInteger(value)


def message_problem(message: Any) -> str | None:
    """What in a parsed JSON message the database cannot store (jsonb refuses \\u0000 in keys
    and values alike) or cannot keep as written (an integer parsed as an _InexactInteger),
    naming where it is; None when it can all be stored."""
    # A stack, not recursion: JSON nests deeper than Python's recursion limit.
    pending: list[tuple[str, Any]] = [("", message)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else key
                if _UNSTORABLE.search(key) is not None:
                    return f"the key {path!r} {_unstorable_what(key)}"
                pending.append((path, item))
        elif isinstance(value, list):
            pending.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str) and _UNSTORABLE.search(value) is not None:
            return f"the value of {where or 'the message'!r} {_unstorable_what(value)}"
        elif isinstance(value, _InexactInteger):
            digits = str(int(value))
            shown = digits if len(digits) <= _QUOTED_TEXT_LIMIT else digits[:_QUOTED_TEXT_LIMIT] + "…"
            return (
                f"the value of {where or 'the message'!r} is an integer beyond 64 bits ({shown}), which "
                "would be stored rounded to the nearest floating-point number: write it as a string"
            )
    return None


def _unstorable_what(text: str) -> str:
    found = _UNSTORABLE.search(text)
    if found is not None and found.group() == "\x00":
        return "holds a NUL character (\\u0000), which the database cannot store"
    return "holds a lone surrogate, which is not Unicode text the database can store"


def parse_message(text: bytes, source: Path) -> dict[str, Any]:
    """The campaign's message: a JSON object the database can store that compiles as a template."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InputError(f"{source}: the message must be a JSON object, not a {type(message).__name__}")
    problem = message_problem(message)
    if problem is not None:
        raise InputError(f"{source}: {problem}")
    try:
        Template(message)
    except TemplateError as exc:
        raise InputError(f"{source}: {exc}") from None
    if _LONG_DIGIT_RUN.search(text) is not None:
        # orjson has already turned a wide integer into a float, like a float literal: only the
        # text tells them apart. After Template, which refuses nesting deeper than the json
        # module's recursion can take.
        problem = message_problem(json.loads(text, parse_int=_exact_integer))
        if problem is not None:
            raise InputError(f"{source}: {problem}")
    return message


def command_line_text(option: str, value: str) -> str:
    """``value`` of ``option`` if the database can store it; InputError otherwise.

    Arguments that are not valid UTF-8 reach Python as lone surrogates (surrogateescape), which
    no text column accepts; NUL cannot be in an argument at all, but is refused all the same.
    """
    found = _UNSTORABLE.search(value)
    if found is None:
        return value
    if found.group() == "\x00":
        raise InputError(f"{option} {value!r}: holds a NUL character")
    raw = value.encode("utf-8", "surrogateescape") if _only_escaped_bytes(value) else value
    raise InputError(f"{option} {raw!r}: not valid UTF-8; give it in UTF-8")


def _only_escaped_bytes(text: str) -> bool:
    """Whether every surrogate in ``text`` is an undecodable byte escaped by surrogateescape."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def campaign_name(name: str | None, recipients_file: Path) -> str:
    """The campaign's name: ``--name``, refused if the database cannot store it, or else the
    recipients file's name.

    The file's name is only a default label nobody typed as a name, and the file itself is
    fine: refusing the load because of it would be a worse answer than a name with U+FFFD
    where its undecodable bytes were. The name shows up as the campaign's; ``--name`` fixes it.
    """
    if name is not None:
        return command_line_text("--name", name)
    return _UNSTORABLE.sub("\ufffd", recipients_file.stem)


# ----------------------------------------------------------------------------- reading the CSV


@dataclass(frozen=True)
class BadRow:
    """A record that was not loaded: ``line`` is where it starts, ``last_line`` where it ends
    when that is a later line (None: the record is that one line)."""

    line: int
    reason: str
    last_line: int | None = None

    @classmethod
    def over(cls, first: int, last: int, reason: str) -> BadRow:
        return cls(first, reason, last if last > first else None)

    @property
    def line_count(self) -> int:
        return 1 if self.last_line is None else self.last_line - self.line + 1

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.last_line is None else f"lines {self.line}-{self.last_line}"


@dataclass
class Tally:
    """What a load did, filled in while the COPY consumes the rows."""

    loaded: int = 0
    no_address: int = 0
    blank_lines: int = 0
    bad_rows: int = 0
    # Physical lines of the bad rows: one stray quote can make a single bad row of thousands.
    bad_lines: int = 0
    examples: list[BadRow] = field(default_factory=list)

    def bad(self, row: BadRow) -> None:
        self.bad_rows += 1
        self.bad_lines += row.line_count
        if len(self.examples) < MAX_REPORTED_BAD_ROWS:
            self.examples.append(row)


# (first line, last line, fields): a quoted field with line breaks makes a record of several.
Record = tuple[int, int, list[str]]


def unparseable(first: int, last: int, error: str) -> str:
    """The reason for a record the csv module gave up on after reading lines first..last."""
    if last == first:
        return f"not valid CSV: {error}"
    # Only a quoted field takes the reader past a line end, so a failure lines later is a quote
    # that never closes where a field can end: everything it read is one broken record.
    return (
        f"not valid CSV: {error}: a quote in this record never closes where a field can end, so "
        f"all {last - first + 1:,} lines were read as one record and none of them was loaded (a "
        f"stray quote on line {first}?)"
    )


def csv_records(lines: Iterable[str]) -> Iterator[Record | BadRow]:
    """Each CSV record with the lines it starts and ends on (1-based), or a BadRow where the
    csv module gives up on one (an unterminated quote, text after a closing quote, a field over
    its limit), spanning every line it read for that record. The reader resumes at the next
    line after such an error."""
    reader = csv.reader(lines, strict=True)
    while True:
        first = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last = max(first, reader.line_num)
            yield BadRow.over(first, last, unparseable(first, last, str(exc)))
            continue
        yield first, reader.line_num, fields


def record_problem(fields: Sequence[str], header: Header, first: int, last: int) -> str | None:
    """Why the record read from lines first..last cannot become a recipient; None when it can."""
    problem = row_problem(fields, header)
    if last == first:
        return problem
    if problem is not None:
        return f"{problem} (quotes take this record over {last - first + 1:,} lines: a stray quote?)"
    return span_problem(fields, header, first)


def recipients(
    records: Iterable[Record | BadRow], header: Header, tally: Tally, *, stop_at_bad: bool
) -> Iterator[tuple[str | None, dict[str, str]]]:
    """The valid recipients of ``records``; bad rows and blank lines are counted in ``tally``.

    With ``stop_at_bad``, nothing more is yielded after the first bad row (the load will be
    rolled back, so writing more is wasted) but every bad row is still counted and reported.
    """
    rejecting = False
    for record in records:
        if isinstance(record, BadRow):
            tally.bad(record)
            rejecting = stop_at_bad
            continue
        first, last, fields = record
        if not fields:
            tally.blank_lines += 1
            continue
        # Nearly every record is one line: its check is row_problem alone, without another call.
        problem = (
            row_problem(fields, header) if first == last else record_problem(fields, header, first, last)
        )
        if problem is not None:
            tally.bad(BadRow.over(first, last, problem))
            rejecting = stop_at_bad
            continue
        if rejecting:
            continue
        address, variables = recipient(fields, header)
        tally.loaded += 1
        # Preparation's rule (prepare_skip_no_address): NULL or btrim(address) = '', and btrim
        # trims spaces only; an address of tabs or other blanks ends invalid_address instead.
        if address is None or not address.strip(" "):
            tally.no_address += 1
        yield address, variables


@contextmanager
def open_recipients(path: Path) -> Iterator[tuple[Header, Iterator[Record | BadRow]]]:
    """The header of a recipients CSV and an iterator over the records after it."""
    try:
        # utf-8-sig: spreadsheets write a byte-order mark. surrogateescape: undecodable bytes
        # become a bad row with its line number instead of an error that ends the whole load.
        stream = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with stream:
        records = csv_records(stream)
        header: Header | None = None
        for record in records:
            if isinstance(record, BadRow):
                raise InputError(f"{path}: {record.where}: the header is {record.reason}")
            line, _, fields = record
            if not fields:
                continue
            try:
                header = parse_header(fields)
            except ValueError as exc:
                raise InputError(f"{path}: line {line}: {exc}") from None
            break
        if header is None:
            raise InputError(f"{path}: the file is empty: it needs a header row with an 'address' column")
        yield header, records


# ----------------------------------------------------------------------------- the database


@dataclass(frozen=True)
class CampaignSpec:
    sender_id: str
    message: dict[str, Any]
    name: str
    rate_per_second: float | None
    start: bool
    on_bad_row: BadRowPolicy


@dataclass(frozen=True)
class Created:
    campaign_id: str
    status: str
    sender_paused_reason: str | None


class Rejected(Exception):
    """Rolls the load back: bad rows under ``--on-bad-row reject``, or no recipient at all."""


async def create_campaign(
    connection: Connection,
    spec: CampaignSpec,
    header: Header,
    records: Iterable[Record | BadRow],
    tally: Tally,
) -> Created:
    """Campaign, recipients and start in one transaction; raises Rejected or DatabaseRefusal
    after rolling back. ``tally`` says what was read, whatever the outcome."""
    reject = spec.on_bad_row == "reject"
    async with connection.transaction():
        await connection.execute(QUERIES["bulk_session"])
        sender = await connection.fetchrow(QUERIES["bulk_sender"], spec.sender_id)
        if sender is None:
            raise DatabaseRefusal(
                f"no sender {spec.sender_id!r}: senders are registered from the config by `campaignd "
                "migrate` (see `campaignd senders`)"
            )
        campaign_id: uuid.UUID = await connection.fetchval(
            QUERIES["bulk_insert_campaign"], spec.name, spec.sender_id, spec.message, spec.rate_per_second
        )
        rows = recipients(records, header, tally, stop_at_bad=reject)
        await connection.copy_records_to_table(
            "recipients",
            schema_name="campaignd",
            columns=["campaign_id", "address", "variables"],
            records=((campaign_id, address, variables) for address, variables in rows),
        )
        if reject and tally.bad_rows:
            raise Rejected(f"{tally.bad_rows} bad {'row' if tally.bad_rows == 1 else 'rows'}")
        if tally.loaded == 0:
            raise Rejected("no recipient to load")
        status = "draft"
        if spec.start:
            status = await connection.fetchval(QUERIES["bulk_start_campaign"], campaign_id)
    return Created(str(campaign_id), status, sender["paused_reason"])


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class CreateOptions:
    sender_id: str
    message_file: Path
    recipients_file: Path
    start: bool
    name: str | None
    rate_per_second: float | None
    on_bad_row: BadRowPolicy


def _err(message: str) -> None:
    print(f"campaignd: {message}", file=sys.stderr)


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _over_lines(tally: Tally) -> str:
    """How many lines the bad rows took, when that is not one each: a count of bad rows alone
    would hide the thousands of lines one stray quote can take out of the load."""
    return "" if tally.bad_lines == tally.bad_rows else f" over {_count(tally.bad_lines, 'line')}"


def report_bad_rows(tally: Tally, source: Path, *, rejected: bool) -> None:
    if not tally.bad_rows:
        return
    verdict = "nothing was created" if rejected else "skipped, the other rows were loaded"
    _err(f"{source}: {_count(tally.bad_rows, 'bad row')}{_over_lines(tally)} ({verdict}):")
    for row in tally.examples:
        print(f"  {row.where}: {row.reason}", file=sys.stderr)
    if tally.bad_rows > len(tally.examples):
        print(f"  … and {tally.bad_rows - len(tally.examples):,} more", file=sys.stderr)


def print_summary(created: Created, spec: CampaignSpec, tally: Tally) -> None:
    print(f"campaign {created.campaign_id}")
    print(f"  name:              {spec.name}")
    print(f"  sender:            {spec.sender_id}")
    print(f"  status:            {created.status}")
    print(f"  recipients loaded: {tally.loaded:,}")
    print(f"  bad rows skipped:  {tally.bad_rows:,}{_over_lines(tally)}")
    if tally.no_address:
        print(f"  without address:   {tally.no_address:,} (skipped as no_address when sending starts)")
    if created.status == "draft":
        print("  a draft: nothing is sent until its status is set to 'sending'")


async def cmd_campaign_create(settings: Settings, options: CreateOptions) -> int:
    from campaignd.operator import OperatorError, connected

    try:
        # A sender id that is not UTF-8 cannot be one from the config, and would crash the query.
        sender_id = command_line_text("--sender", options.sender_id)
        name = campaign_name(options.name, options.recipients_file)
        message = parse_message(_read_bytes(options.message_file), options.message_file)
        with open_recipients(options.recipients_file) as (header, records):
            check_placeholders(Template(message), header, options.recipients_file)
            spec = CampaignSpec(
                sender_id=sender_id,
                message=message,
                name=name,
                rate_per_second=options.rate_per_second,
                start=options.start,
                on_bad_row=options.on_bad_row,
            )
            tally = Tally()
            try:
                async with connected(settings) as connection:
                    created = await create_campaign(connection, spec, header, records, tally)
            except Rejected as exc:
                report_bad_rows(tally, options.recipients_file, rejected=True)
                _err(f"{options.recipients_file}: {exc}: no campaign was created")
                return EXIT_INPUT
    except InputError as exc:
        _err(str(exc))
        return EXIT_INPUT
    except (DatabaseRefusal, OperatorError) as exc:
        _err(str(exc))
        return EXIT_FAILURE
    report_bad_rows(tally, options.recipients_file, rejected=False)
    print_summary(created, spec, tally)
    if created.sender_paused_reason is not None:
        _err(
            f"warning: sender {spec.sender_id} is paused ({created.sender_paused_reason}): nothing is "
            f"sent until `campaignd resume-sender {spec.sender_id}`"
        )
    return EXIT_OK


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
