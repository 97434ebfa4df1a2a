"""``campaignd campaign create``: a campaign and its recipients from a message file and a CSV.

The row decisions are pure functions, tested without a database; the load runs against the
real PostgreSQL, in process and as the installed ``campaignd`` console command.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from campaignd.bulkload import (
    MAX_REPORTED_BAD_ROWS,
    BadRow,
    CampaignSpec,
    DatabaseRefusal,
    Header,
    InputError,
    Rejected,
    Tally,
    campaign_name,
    check_placeholders,
    command_line_text,
    create_campaign,
    csv_records,
    open_recipients,
    parse_header,
    parse_message,
    recipient,
    recipients,
    row_problem,
)
from campaignd.fakeprovider import FakeProvider
from campaignd.providers.http import MAX_ADDRESS_LENGTH
from campaignd.render import MAX_VARIABLE_LENGTH, Template
from campaignd.sql import QUERIES
from tests.conftest import (
    assert_counters_match,
    daemon_config,
    register_sender,
    wait_for,
    wait_status,
)
from tests.test_operator import Ran, ops_config

CONSOLE = Path(sys.executable).parent / "campaignd"
MESSAGE = {"text": "Hi {{first_name}}, {{offer}}"}
HEADER = Header(("address", "first_name", "offer"), 0)


async def console(*args: str, timeout: float = 120) -> Ran:
    """The installed ``campaignd`` entry point, as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def write_message(path: Path, message: Any = MESSAGE) -> Path:
    path.write_text(json.dumps(message))
    return path


def records(text: str) -> list[Any]:
    return list(csv_records(io.StringIO(text, newline="")))


def spec(**overrides: Any) -> CampaignSpec:
    values: dict[str, Any] = {
        "sender_id": "sms",
        "message": MESSAGE,
        "name": "bulk",
        "rate_per_second": None,
        "start": False,
        "on_bad_row": "skip",
    }
    return CampaignSpec(**{**values, **overrides})


async def counts(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM campaignd.campaigns) AS c,"
        " (SELECT count(*) FROM campaignd.recipients) AS r"
    )
    assert row is not None
    return row["c"], row["r"]


# ----------------------------------------------------------------- pure: header and rows


def test_the_address_column_may_stand_anywhere_and_be_capitalised() -> None:
    header = parse_header([" first_name", "Address ", "offer"])

    assert header.address_index == 1
    assert header.variable_names == ("first_name", "offer")
    assert recipient(["Ada", "+15550001", "20%"], header) == (
        "+15550001",
        {"first_name": "Ada", "offer": "20%"},
    )


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (["phone", "name"], "no 'address' column (columns: phone, name)"),
        (["address", "name", "ADDRESS"], "2 'address' columns"),
        (["address", "name", "name"], "names column 'name' twice"),
        (["address", "", "x"], "column 2 of the header has no name"),
        (["address", "na\x00me"], "column 2 of the header holds a NUL byte"),
    ],
)
def test_a_header_without_one_address_or_with_unusable_names_is_refused(
    fields: list[str], problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_header(fields)


def test_an_empty_address_is_a_recipient_the_daemon_skips_not_a_bad_row() -> None:
    assert row_problem(["", "Ada", "x"], HEADER) is None
    assert recipient(["", "Ada", "x"], HEADER) == (None, {"first_name": "Ada", "offer": "x"})
    assert recipient(["  ", "", "x"], HEADER) == ("  ", {"first_name": "", "offer": "x"})


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (["+1", "Ada"], "2 fields, the header has 3"),
        (["+1"], "1 field, the header has 3"),
        (["+1", "Ada", "x", "extra"], "4 fields, the header has 3"),
        (["+1", "A\x00da", "x"], "column 'first_name' holds a NUL byte"),
        (["+1", "Ada", "\udcff"], "column 'offer' holds bytes that are not UTF-8"),
        (["7" * (MAX_ADDRESS_LENGTH + 1), "Ada", "x"], f"more than {MAX_ADDRESS_LENGTH}"),
        (
            ["+1", "Ada", "x" * (MAX_VARIABLE_LENGTH + 1)],
            f"column 'offer' is {MAX_VARIABLE_LENGTH + 1} characters",
        ),
    ],
)
def test_bad_rows_say_what_is_wrong(fields: list[str], problem: str) -> None:
    found = row_problem(fields, HEADER)

    assert found is not None and problem in found


def test_values_at_the_limits_are_fine_and_padding_does_not_count_against_the_address() -> None:
    padded = "  " + "7" * MAX_ADDRESS_LENGTH + "  "

    assert row_problem([padded, "é" * MAX_VARIABLE_LENGTH, "x"], HEADER) is None


def test_records_carry_the_lines_they_start_and_end_on_through_quotes_and_newlines() -> None:
    text = 'address,first_name,offer\r\n+1,"Ada, the first","say ""hi""\nthen go"\r\n\r\n+2,Bob,x\n'

    assert records(text) == [
        (1, 1, ["address", "first_name", "offer"]),
        (2, 3, ["+1", "Ada, the first", 'say "hi"\nthen go']),
        (4, 4, []),
        (5, 5, ["+2", "Bob", "x"]),
    ]


def test_unparseable_records_are_bad_rows_and_reading_goes_on() -> None:
    text = 'address,first_name,offer\n+1,"Ada"x,y\n+2,Bob,' + "x" * 200_000 + '\n+3,Cy,z\n+4,"open\n'

    found = records(text)

    assert found[1:3] == [BadRow(2, found[1].reason), BadRow(3, found[2].reason)]
    assert "not valid CSV" in found[1].reason and "field limit" in found[2].reason
    assert found[3] == (4, 4, ["+3", "Cy", "z"])
    assert isinstance(found[4], BadRow) and found[4].line == 5 and "unexpected end of data" in found[4].reason
    assert found[4].last_line is None and found[4].where == "line 5"


def stray_quote_lines(rows: int = 20_000, at: int = 4) -> list[str]:
    """A recipients file of ``rows`` valid rows but for a stray quote on line ``at``, as lines."""
    lines = ["address,first_name,offer"] + [f"+1555{i:07d},name {i},offer {i}" for i in range(rows)]
    lines[at - 1] = f'+1555{at - 2:07d},"Acme Inc'
    return lines


def test_a_record_the_csv_module_gives_up_on_lines_later_is_bad_over_every_line_it_read() -> None:
    text = (
        'address,first_name,offer\n+1,a,b\n+2,"Acme Inc\n+3,c,d\n+4,"Smith, J",e\n+5,f,g\n+6,"open\n+7,h,i\n'
    )

    found = records(text)

    assert found[1] == (2, 2, ["+1", "a", "b"])
    assert isinstance(found[2], BadRow) and (found[2].line, found[2].last_line) == (3, 5)
    assert found[2].where == "lines 3-5" and found[2].line_count == 3
    assert "',' expected after '\"'" in found[2].reason and "stray quote on line 3" in found[2].reason
    assert found[3] == (6, 6, ["+5", "f", "g"])
    assert isinstance(found[4], BadRow) and (found[4].line, found[4].last_line) == (7, 8)
    assert "unexpected end of data" in found[4].reason
    assert len(found) == 5


def test_a_stray_quote_that_hits_the_field_limit_accounts_for_every_line_it_swallowed() -> None:
    lines = stray_quote_lines()
    tally = Tally()

    loaded = list(recipients(records("\n".join(lines) + "\n")[1:], HEADER, tally, stop_at_bad=False))

    assert tally.bad_rows == 1 and tally.examples[0].line == 4
    last = tally.examples[0].last_line
    assert last is not None and last > 1000 and "field limit" in tally.examples[0].reason
    assert tally.loaded + tally.bad_lines == len(lines) - 1 == 20_000
    # The lines the report names are exactly the ones missing: all the others were loaded.
    outside = [n for n in range(2, len(lines) + 1) if not 4 <= n <= last]
    assert [address for address, _ in loaded] == [lines[n - 1].split(",")[0] for n in outside]


def test_recipients_count_blank_lines_and_bad_rows_and_stop_yielding_when_rejecting() -> None:
    text = "address,first_name,offer\n+1,Ada,x\n\n+2,Bob\n,Cy,z\n+4,Di,w\n"
    lines = records(text)[1:]

    skipping = Tally()
    assert list(recipients(lines, HEADER, skipping, stop_at_bad=False)) == [
        ("+1", {"first_name": "Ada", "offer": "x"}),
        (None, {"first_name": "Cy", "offer": "z"}),
        ("+4", {"first_name": "Di", "offer": "w"}),
    ]
    assert (skipping.loaded, skipping.no_address, skipping.blank_lines, skipping.bad_rows) == (3, 1, 1, 1)
    assert skipping.examples == [BadRow(4, "2 fields, the header has 3")]

    rejecting = Tally()
    assert len(list(recipients(lines, HEADER, rejecting, stop_at_bad=True))) == 1
    assert rejecting.bad_rows == 1


@pytest.mark.parametrize(
    ("text", "lines", "problem"),
    [
        # Closed by a second stray quote two lines on: three fields, as the header wants.
        (
            'address,first_name,offer\n+2,"Acme\n+3,b,c\n+4,Cy",z\n',
            (2, 4),
            "line 3 inside column 'first_name'",
        ),
        # Closed on the very next line: only part of the swallowed row is inside the field.
        ('address,first_name,offer\n+2,"Acme\n+3,Bob",x\n', (2, 3), "line 3 inside column 'first_name'"),
        # Opened before the address column: the swallowed row is the rest of the quote's line.
        ('first_name,address,offer\n"Ada,+2,x\nBob",+3,y\n', (2, 3), "line 2 inside column 'first_name'"),
        ('address,first_name,offer\nada@x.org,"Acme\nbob@y.org,B,c\nx",z\n', (2, 4), "('bob@y.org,B,c')"),
        ('address,first_name,offer\n"+2\n+3",b,c\n', (2, 3), "the address runs over several lines"),
        (
            'address,first_name,offer\n+2,"Acme\n+3,b,c\n+4,Cy\n",z,extra\n',
            (2, 5),
            "4 fields, the header has 3",
        ),
        # Phone numbers written with the separators the providers accept are phone numbers too.
        (
            'address,name\n+44 20 7946 0001,"Ann\n+44 20 7946 0002,Bob\n+44 20 7946 0003,Cy"\n',
            (2, 4),
            "line 3 inside column 'name' reads like a row of its own ('+44 20 7946 0002,Bob')",
        ),
        (
            'address,name\n+1 (555) 000-0001,"Ann\n+1 (555) 000-0002,Bob\n+1 (555) 000-0003,Cy"\n',
            (2, 4),
            "line 3 inside column 'name'",
        ),
        (
            'address,name\n+44\u00a020\u00a07946,"Ann\n+44\u00a020\u00a07947,Bob"\n',
            (2, 3),
            "line 3 inside column 'name'",
        ),
        # No address of its own to compare with: a swallowed line of the header's width with a
        # phone number or an email where the address goes is a row all the same.
        ('address,name\n,"Ann\n+15550002,Bob\n+15550003,Cy"\n', (2, 4), "line 3 inside column 'name'"),
        (
            'address,first_name,offer\n,"Ann\n+44 20 7946 0002,Bob,x\n+44 20 7946 0003",y\n',
            (2, 4),
            "line 3 inside column 'first_name'",
        ),
        (
            'address,first_name,offer\nnot known,"Ann\nbob@y.org,Bob",z\n',
            (2, 3),
            "line 3 inside column 'first_name'",
        ),
        ('first_name,address,offer\n"Ada,+2,x\nBob",,y\n', (2, 3), "line 2 inside column 'first_name'"),
    ],
)
def test_a_record_over_several_lines_that_swallowed_rows_is_bad_over_all_of_them(
    text: str, lines: tuple[int, int], problem: str
) -> None:
    header = parse_header(next(csv.reader(io.StringIO(text))))
    skipping, rejecting = Tally(), Tally()

    assert list(recipients(records(text)[1:], header, skipping, stop_at_bad=False)) == []
    assert list(recipients(records(text)[1:], header, rejecting, stop_at_bad=True)) == []

    for tally in (skipping, rejecting):
        [bad] = tally.examples
        assert (bad.line, bad.last_line) == lines and problem in bad.reason
        assert (tally.loaded, tally.bad_rows, tally.bad_lines) == (0, 1, lines[1] - lines[0] + 1)


@pytest.mark.parametrize(
    ("address", "value"),
    [
        ("+15550001", "20% off,\n today"),
        ("+15550001", 'line one\nline "two", quoted'),
        ("+15550001", "Dear Ada,\nThanks, see you\nBob"),
        ("+15550001", "12 Main St, Apt 4\nSpringfield, IL 62701"),
        ("ada@example.org", "Call us,\n+1 555 0100, any day"),
        ("+44 20 7946 0001", "Dear Ada,\nThanks, see you\nBob"),
        ("+1 (555) 000-0001", "12 Main St, Apt 4\nSpringfield, IL 62701"),
        ("+1 (555) 000-0001", "Prices,\n1 200, 3 400 or 5 600"),
        # A note's lines that start with a national number or a date are not rows.
        ("+447700900123", "Notes:\n020 7946 0018, ask for reception"),
        ("+447700900123", "Notes:\n12/05/2024, called back"),
        ("+44 7700 900123", "Notes:\n020 7946 0018, ask for reception"),
        # Without an address to compare with, only a line as wide as the header is a row.
        ("", "Dear Ada,\nThanks, see you\nBob"),
        ("", "Call us,\n+1 555 0100, any day"),
        ("", "Best, regards,\nthe team"),
        ("  ", "12 Main St, Apt 4\nSpringfield, IL 62701"),
    ],
)
def test_variables_over_several_lines_that_read_as_text_are_one_recipient(address: str, value: str) -> None:
    text = io.StringIO(newline="")
    csv.writer(text).writerows([["address", "first_name", "offer"], [address, "Ada", value]])
    tally = Tally()

    loaded = list(recipients(records(text.getvalue())[1:], HEADER, tally, stop_at_bad=True))

    assert loaded == [(address or None, {"first_name": "Ada", "offer": value})]
    assert tally.bad_rows == 0


def test_bad_row_examples_are_capped_but_all_are_counted() -> None:
    tally = Tally()
    for line in range(MAX_REPORTED_BAD_ROWS + 5):
        tally.bad(BadRow(line, "x"))

    assert tally.bad_rows == MAX_REPORTED_BAD_ROWS + 5 and len(tally.examples) == MAX_REPORTED_BAD_ROWS


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"text": "hi"', "not valid JSON"),
        (b'["hi"]', "must be a JSON object, not a list"),
        (b'"hi"', "must be a JSON object, not a str"),
        (b"{}", "non-empty JSON object"),
        (b'{"text": "Hi {{name"}', "malformed placeholder"),
    ],
)
def test_a_message_that_is_not_a_usable_json_object_names_the_file(text: bytes, problem: str) -> None:
    with pytest.raises(InputError, match=re.escape(problem)) as raised:
        parse_message(text, Path("spring.json"))

    assert str(raised.value).startswith("spring.json: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"text": "hi {{name}} \\u0000"}', "the value of 'text' holds a NUL character (\\u0000)"),
        (b'{"te\\u0000xt": "hi"}', "the key 'te\\x00xt' holds a NUL character"),
        (b'{"text": "hi", "buttons": [{"label": "ok"}, {"label": "\\u0000"}]}', "'buttons[1].label'"),
        (b'{"text": "hi", "meta": {"a\\u0000": 1}}', "the key 'meta.a\\x00'"),
    ],
)
def test_a_message_the_database_cannot_store_is_refused_naming_the_file(text: bytes, problem: str) -> None:
    with pytest.raises(InputError, match=re.escape(problem)) as raised:
        parse_message(text, Path("spring.json"))

    assert str(raised.value).startswith("spring.json: ")


def test_a_deeply_nested_message_is_checked_without_recursion() -> None:
    deep = b'{"text": "hi", "x": ' + b"[" * 1000 + b'"\\u0000"' + b"]" * 1000 + b"}"

    with pytest.raises(InputError, match="NUL character"):
        parse_message(deep, Path("m.json"))


def test_a_name_or_sender_that_is_not_utf8_is_refused_and_a_file_name_is_made_storable() -> None:
    undecodable = os.fsdecode(b"caf\xe9")

    with pytest.raises(InputError, match=re.escape("--name b'caf\\xe9': not valid UTF-8")):
        campaign_name(undecodable, Path("r.csv"))
    with pytest.raises(InputError, match=re.escape("--sender b'caf\\xe9': not valid UTF-8")):
        command_line_text("--sender", undecodable)
    assert campaign_name(None, Path(os.fsdecode(b"/tmp/caf\xe9 sale.csv"))) == "caf\ufffd sale"
    assert campaign_name("café", Path(os.fsdecode(b"caf\xe9.csv"))) == "café"
    assert campaign_name(None, Path("spring.csv")) == "spring"


def test_every_placeholder_needs_a_column() -> None:
    template = Template({"text": "Hi {{first_name}} {{last_name}}"})

    with pytest.raises(InputError, match=r"uses \{\{last_name\}\} but the CSV has no such column"):
        check_placeholders(template, HEADER, Path("r.csv"))
    check_placeholders(Template({"text": "Hi {{first_name}}"}), HEADER, Path("r.csv"))


def test_an_address_placeholder_is_refused_as_one_the_daemon_cannot_fill() -> None:
    header = parse_header(["first_name", "Address", "offer"])

    for text in ("Hi {{first_name}}, your number is {{address}}", "{{Address}} {{offer}}"):
        with pytest.raises(InputError) as raised:
            check_placeholders(Template({"text": text}), header, Path("r.csv"))
        said = str(raised.value)
        assert said.startswith("r.csv: the message uses {{")
        assert "which the daemon cannot fill: the 'Address' column is where each message is sent" in said
        assert "skipped as missing_variable" in said and "no such column" not in said
    # The renderer fills placeholders from the variables alone: the address is not among them.
    assert recipient(["Ada", "+15550001", "x"], header)[1] == {"first_name": "Ada", "offer": "x"}

    with pytest.raises(InputError, match=r"cannot fill.*; the message uses \{\{zip\}\} but the CSV has no"):
        check_placeholders(Template({"text": "{{address}} {{zip}}"}), header, Path("r.csv"))


def test_an_integer_beyond_64_bits_is_refused_naming_where_it_is_not_rounded() -> None:
    wide = b'{"text": "hi", "meta": {"ids": [1, 123456789012345678901234567890]}}'

    with pytest.raises(InputError) as raised:
        parse_message(wide, Path("m.json"))
    said = str(raised.value)
    assert said.startswith("m.json: the value of 'meta.ids[1]' is an integer beyond 64 bits")
    assert "123456789012345678901234567890" in said and "write it as a string" in said
    with pytest.raises(
        InputError, match=re.escape("'n' is an integer beyond 64 bits (-9223372036854775809)")
    ):
        parse_message(b'{"text": "hi", "n": -9223372036854775809}', Path("m.json"))

    # What orjson keeps exactly is kept, and digits in text or a float are not integers.
    edges = (
        b'{"text": "1234567890123456789012", "u": 18446744073709551615, "i": -9223372036854775808,'
        b' "f": 1.5e30}'
    )
    message = parse_message(edges, Path("m.json"))
    assert (message["u"], message["i"], message["f"]) == (2**64 - 1, -(2**63), 1.5e30)


def test_a_file_without_a_header_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")

    with pytest.raises(InputError, match=r"empty\.csv: the file is empty"), open_recipients(empty):
        pass
    with pytest.raises(InputError, match="cannot open"), open_recipients(tmp_path / "missing.csv"):
        pass


# ----------------------------------------------------------------- loading, in process


async def load(conn: asyncpg.Connection, path: Path, **overrides: Any) -> tuple[str, Tally]:
    tally = Tally()
    with open_recipients(path) as (header, rows):
        created = await create_campaign(conn, spec(**overrides), header, rows, tally)
    return created.campaign_id, tally


async def test_quotes_newlines_and_unicode_arrive_as_written_in_file_order(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    await register_sender(conn, "sms")
    rows = [
        ["first_name", "address", "offer"],
        ["Zoë 🎉", "+15550001", 'line one\nline "two", quoted'],
        ["名前", "  ", "x"],
        ["Ada", "+15550003", ""],
    ]
    path = write_csv(tmp_path / "r.csv", rows)
    # A spreadsheet's byte-order mark is not part of the first column's name.
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    campaign_id, tally = await load(conn, path, start=True, rate_per_second=5.0, name="spring")

    assert (tally.loaded, tally.bad_rows, tally.no_address) == (3, 0, 1)
    stored = await conn.fetch(
        "SELECT address, variables, state FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id",
        campaign_id,
    )
    assert [(r["address"], r["variables"], r["state"]) for r in stored] == [
        ("+15550001", {"first_name": "Zoë 🎉", "offer": 'line one\nline "two", quoted'}, "pending"),
        ("  ", {"first_name": "名前", "offer": "x"}, "pending"),
        ("+15550003", {"first_name": "Ada", "offer": ""}, "pending"),
    ]
    row = await conn.fetchrow("SELECT * FROM campaignd.campaigns WHERE id = $1", campaign_id)
    assert row is not None
    assert (row["name"], row["sender_id"], row["status"], row["rate_per_second"]) == (
        "spring",
        "sms",
        "sending",
        5.0,
    )
    assert row["message"] == MESSAGE


async def test_bad_rows_are_skipped_or_reject_the_whole_file(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    await register_sender(conn, "sms")
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"address,first_name,offer\n+1,Ada,x\n+2,B\xffb,x\n+3,Cy\n+4,Di,w\n")

    rejected = Tally()
    with pytest.raises(Rejected, match="2 bad rows"), open_recipients(path) as (header, rows):
        await create_campaign(conn, spec(on_bad_row="reject"), header, rows, rejected)
    assert [row.line for row in rejected.examples] == [3, 4]
    assert await counts(conn) == (0, 0)

    campaign_id, tally = await load(conn, path)
    assert (tally.loaded, tally.bad_rows) == (2, 2)
    assert "not UTF-8" in tally.examples[0].reason and "2 fields" in tally.examples[1].reason
    addresses = await conn.fetch(
        "SELECT address FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id", campaign_id
    )
    assert [r["address"] for r in addresses] == ["+1", "+4"]


async def test_spaced_phone_numbers_do_not_hide_the_rows_a_stray_quote_swallowed(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    await register_sender(conn, "sms")
    path = tmp_path / "spaced.csv"
    path.write_text(
        "address,first_name,offer\n"
        '+44 20 7946 0001,"Ann,x\n+44 20 7946 0002,Bob,y\n+44 20 7946 0003,Cy",z\n'
        "+44 20 7946 0004,Dee,w\n"
    )

    with pytest.raises(Rejected, match="1 bad row"):
        await load(conn, path, on_bad_row="reject")
    assert await counts(conn) == (0, 0)

    campaign_id, tally = await load(conn, path)

    assert (tally.loaded, tally.bad_rows, tally.bad_lines) == (1, 1, 3)
    assert (
        tally.examples[0].where == "lines 2-4"
        and "line 3 inside column 'first_name'" in tally.examples[0].reason
    )
    stored = await conn.fetch("SELECT address FROM campaignd.recipients WHERE campaign_id = $1", campaign_id)
    assert [r["address"] for r in stored] == ["+44 20 7946 0004"]


async def test_addresses_counted_without_address_are_those_preparation_skips_as_no_address(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    await register_sender(conn, "sms")
    addresses = ["", "   ", "\t", " \t ", "\u00a0", "\u2003", "+15550001"]
    path = write_csv(
        tmp_path / "blank.csv", [["address", "first_name", "offer"]] + [[a, "Ada", "x"] for a in addresses]
    )

    campaign_id, tally = await load(conn, path)

    assert tally.loaded == len(addresses)
    skipped = await conn.execute(QUERIES["prepare_skip_no_address"], campaign_id, 0, 2**63 - 1)
    assert (tally.no_address, skipped) == (2, "UPDATE 2")


async def test_an_error_mid_load_leaves_no_campaign(tmp_path: Path, conn: asyncpg.Connection) -> None:
    await register_sender(conn, "sms")
    path = write_csv(
        tmp_path / "r.csv", [["address", "first_name", "offer"]] + [[f"+{i}", "a", "b"] for i in range(5000)]
    )

    def failing_disk(rows: Iterator[Any]) -> Iterator[Any]:
        for count, row in enumerate(rows):
            if count == 3000:
                raise OSError("I/O error")
            yield row

    with pytest.raises(OSError, match="I/O error"), open_recipients(path) as (header, rows):
        await create_campaign(conn, spec(start=True), header, failing_disk(rows), Tally())

    assert await counts(conn) == (0, 0)


async def test_an_unknown_sender_or_an_all_bad_file_creates_nothing(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    path = write_csv(tmp_path / "r.csv", [["address", "first_name", "offer"], ["+1", "a", "b"]])

    with pytest.raises(DatabaseRefusal, match="no sender 'sms'"):
        await load(conn, path)

    await register_sender(conn, "sms")
    only_bad = write_csv(tmp_path / "bad.csv", [["address", "first_name", "offer"], ["+1", "a"]])
    with pytest.raises(Rejected, match="no recipient"):
        await load(conn, only_bad)
    assert await counts(conn) == (0, 0)


async def test_a_stray_quote_loads_every_row_outside_the_lines_it_reports_or_rejects_the_file(
    tmp_path: Path, conn: asyncpg.Connection
) -> None:
    await register_sender(conn, "sms")
    lines = stray_quote_lines(rows=3000, at=4)
    # The first quoted field after the stray quote: its opening quote closes the stray field, the
    # text after it is what the csv module gives up on, and the rest of that record, read as a
    # record of its own from the next line, is a bad row too.
    lines[2000] = '+15550099999,"Bo","two'
    lines[2001] = 'lines"'
    path = tmp_path / "stray.csv"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(Rejected, match="2 bad rows"):
        await load(conn, path, on_bad_row="reject")
    assert await counts(conn) == (0, 0)

    campaign_id, tally = await load(conn, path)

    assert [(bad.line, bad.last_line) for bad in tally.examples] == [(4, 2001), (2002, None)]
    assert "',' expected after" in tally.examples[0].reason and "1 field," in tally.examples[1].reason
    assert tally.loaded + tally.bad_lines == len(lines) - 1
    stored = await conn.fetch(
        "SELECT address FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id", campaign_id
    )
    addresses = [lines[n - 1].split(",")[0] for n in range(2, len(lines) + 1) if not 4 <= n <= 2002]
    assert [r["address"] for r in stored] == addresses


# ----------------------------------------------------------------- the console command


async def test_console_command_creates_and_starts_a_campaign_a_daemon_sends(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    await register_sender(conn, "sms")
    rows = [["address", "first_name", "offer"]]
    rows += [[f"+1555{i:07d}", f"Zoë {i}", "20% off,\n today"] for i in range(40)]
    rows += [["", "nobody", "x"], ["+1", "too", "many", "fields"]]
    csv_path = write_csv(tmp_path / "spring sale.csv", rows)
    message = write_message(tmp_path / "message.json")
    daemon = daemons(config)

    ran = await console(
        "campaign", "create", "--config", str(config), "--sender", "sms", "--message", str(message),
        "--recipients", str(csv_path), "--start", "--rate", "500",
    )  # fmt: skip

    assert ran.returncode == 0, ran.stderr
    campaign_id = re.search(r"^campaign ([0-9a-f-]{36})$", ran.stdout, re.MULTILINE)
    assert campaign_id is not None, ran.stdout
    assert re.search(r"status:\s+sending", ran.stdout)
    assert re.search(r"recipients loaded:\s+41\b", ran.stdout)
    assert re.search(r"bad rows skipped:\s+1\b", ran.stdout)
    assert re.search(r"without address:\s+1 ", ran.stdout)
    # Physical lines, as an editor shows them: each record above spans two.
    assert "line 83: 4 fields, the header has 3" in ran.stderr
    row = await wait_status(conn, campaign_id[1], "completed", timeout=60)
    assert (row["name"], row["sent_count"], row["skipped_count"]) == ("spring sale", 40, 1)
    await assert_counters_match(conn, campaign_id[1])
    bodies = sorted(a.body["message"]["text"] for a in fake.accepted())
    assert bodies[0] == "Hi Zoë 0, 20% off,\n today"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_console_command_rejects_bad_rows_listing_the_first_twenty(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    config = ops_config(tmp_path, database_url)
    await register_sender(conn, "sms")
    rows = [["address", "first_name", "offer"]] + [[f"+{i}", "a", "b"] for i in range(100)]
    rows += [[f"+{i}", "short"] for i in range(25)]
    csv_path = write_csv(tmp_path / "r.csv", rows)
    message = write_message(tmp_path / "m.json")
    base = ("campaign", "create", "--config", str(config), "--sender", "sms", "--message", str(message))

    ran = await console(*base, "--recipients", str(csv_path), "--on-bad-row", "reject", "--start")

    assert ran.returncode == 2, ran.stderr
    assert "25 bad rows (nothing was created)" in ran.stderr
    listed = re.findall(r"^  line (\d+): 2 fields, the header has 3$", ran.stderr, re.MULTILINE)
    assert listed == [str(line) for line in range(102, 122)]
    assert "… and 5 more" in ran.stderr and "no campaign was created" in ran.stderr
    assert await counts(conn) == (0, 0)

    not_json = tmp_path / "broken.json"
    not_json.write_text("[1, 2]")
    bad_message = await console(
        "campaign", "create", "--config", str(config), "--sender", "sms", "--message", str(not_json),
        "--recipients", str(csv_path),
    )  # fmt: skip
    assert bad_message.returncode == 2
    assert f"{not_json}: the message must be a JSON object, not a list" in bad_message.stderr

    unknown = await console(*base, "--recipients", str(csv_path), "--sender", "mail")
    assert unknown.returncode == 1 and "no sender 'mail'" in unknown.stderr
    assert await counts(conn) == (0, 0)

    bad_rate = await console(*base, "--recipients", str(csv_path), "--rate", "0")
    assert bad_rate.returncode == 2 and "must be a number above 0" in bad_rate.stderr
    # Above a sender's bound, no cap can be sized for it (schema 8 refuses it too).
    huge_rate = await console(*base, "--recipients", str(csv_path), "--rate", "1e308")
    assert huge_rate.returncode == 2 and "at most 1,000,000" in huge_rate.stderr

    draft = await console(*base, "--recipients", str(csv_path), "--name", "as a draft")
    assert draft.returncode == 0, draft.stderr
    assert re.search(r"status:\s+draft", draft.stdout) and "25 bad rows (skipped" in draft.stderr
    assert await counts(conn) == (1, 100)


async def test_killing_the_command_mid_copy_leaves_no_campaign(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    config = ops_config(tmp_path, database_url)
    await register_sender(conn, "sms")
    csv_path = tmp_path / "big.csv"
    with csv_path.open("w") as handle:
        handle.write("address,first_name,offer\n")
        handle.writelines(f"+1555{i:07d},name {i},offer {i}\n" for i in range(500_000))
    message = write_message(tmp_path / "m.json")
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE), "campaign", "create", "--config", str(config), "--sender", "sms",
        "--message", str(message), "--recipients", str(csv_path), "--start",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    database = urlsplit(database_url).path.lstrip("/")

    async def copying() -> bool:
        copied = await conn.fetchval(
            "SELECT tuples_processed FROM pg_stat_progress_copy p JOIN pg_database d ON d.oid = p.datid"
            " WHERE d.datname = $1",
            database,
        )
        return bool(copied and copied > 1000)

    try:
        await wait_for(copying, timeout=60, interval=0.02, what="the COPY to be under way")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.wait()
    assert process.returncode == -signal.SIGKILL, "the load finished before it could be killed"

    async def backend_gone() -> bool:
        others = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
        )
        return others == 0

    await wait_for(backend_gone, timeout=30, what="the killed command's session to end")
    assert await counts(conn) == (0, 0)


async def test_console_command_reports_every_line_a_stray_quote_swallowed(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    config = ops_config(tmp_path, database_url)
    await register_sender(conn, "sms")
    csv_path = tmp_path / "stray.csv"
    csv_path.write_text("\n".join(stray_quote_lines()) + "\n")
    message = write_message(tmp_path / "m.json")
    base = ("campaign", "create", "--config", str(config), "--sender", "sms", "--message", str(message))

    rejected = await console(*base, "--recipients", str(csv_path), "--on-bad-row", "reject")

    assert rejected.returncode == 2, rejected.stderr
    assert re.search(r"1 bad row over [\d,]+ lines \(nothing was created\)", rejected.stderr)
    assert await counts(conn) == (0, 0)

    ran = await console(*base, "--recipients", str(csv_path))

    assert ran.returncode == 0, ran.stderr
    span = re.search(r"^  lines 4-(\d+): not valid CSV: field larger than field limit", ran.stderr, re.M)
    loaded = re.search(r"recipients loaded:\s+([\d,]+)$", ran.stdout, re.M)
    skipped = re.search(r"bad rows skipped:\s+1 over ([\d,]+) lines$", ran.stdout, re.M)
    assert span and loaded and skipped, (ran.stdout, ran.stderr)
    bad_lines = int(skipped[1].replace(",", ""))
    assert int(span[1]) - 4 + 1 == bad_lines
    assert int(loaded[1].replace(",", "")) + bad_lines == 20_000
    assert await counts(conn) == (1, 20_000 - bad_lines)


async def test_console_command_refuses_what_the_database_cannot_store_without_a_traceback(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection
) -> None:
    config = ops_config(tmp_path, database_url)
    await register_sender(conn, "sms")
    csv_path = write_csv(tmp_path / "r.csv", [["address", "first_name", "offer"], ["+1", "a", "b"]])
    message = write_message(tmp_path / "m.json")
    nul_value = tmp_path / "nul.json"
    nul_value.write_bytes(b'{"text": "hi {{first_name}} {{offer}} \\u0000"}')
    nul_key = tmp_path / "nul-key.json"
    nul_key.write_bytes(b'{"text": "hi {{first_name}}", "\\u0000": "x"}')
    wide = tmp_path / "wide.json"
    wide.write_bytes(b'{"text": "hi {{first_name}}", "n": 123456789012345678901234567890}')
    undecodable = os.fsdecode(b"caf\xe9")

    def create(*args: str, message: Path = message, recipients: Path = csv_path) -> list[str]:
        return [
            "campaign", "create", "--config", str(config), "--sender", "sms", "--message", str(message),
            "--recipients", str(recipients), *args,
        ]  # fmt: skip

    for argv, said in [
        (create(message=nul_value), f"{nul_value}: the value of 'text' holds a NUL character (\\u0000)"),
        (create(message=nul_key), f"{nul_key}: the key '\\x00' holds a NUL character"),
        (create(message=wide), f"{wide}: the value of 'n' is an integer beyond 64 bits"),
        (create("--name", undecodable), "--name b'caf\\xe9': not valid UTF-8"),
        (create("--sender", undecodable), "--sender b'caf\\xe9': not valid UTF-8"),
    ]:
        ran = await console(*argv)
        assert (ran.returncode, "Traceback" in ran.stderr) == (2, False), ran.stderr
        assert said in ran.stderr
    assert await counts(conn) == (0, 0)

    # Named only by its file, the campaign is created with the undecodable bytes replaced.
    odd_file = write_csv(
        tmp_path / f"{undecodable}.csv", [["address", "first_name", "offer"], ["+1", "a", "b"]]
    )
    ran = await console(*create(recipients=odd_file))
    assert ran.returncode == 0, ran.stderr
    assert await conn.fetchval("SELECT name FROM campaignd.campaigns") == "caf\ufffd"
