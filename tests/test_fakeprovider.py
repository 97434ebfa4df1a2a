from __future__ import annotations

import asyncio
import gc
import json
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from campaignd.fakeprovider import (
    RECORDS_PATH,
    Accepted,
    Behaviour,
    FakeProvider,
    Rule,
    behaviour_from_dict,
    max_in_window,
)

CAMPAIGN = "6f1c1d0e-4b8e-4c57-9a39-1d2f0c7e9a01"


@pytest.fixture
async def fp() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider()
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _body(address: str, recipient_id: int) -> dict[str, Any]:
    return {"to": address, "message": {"text": "hi"}, "campaign_id": CAMPAIGN, "recipient_id": recipient_id}


async def _send(
    session: aiohttp.ClientSession,
    fp: FakeProvider,
    address: str,
    recipient_id: int,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    all_headers = {"Idempotency-Key": key or f"{CAMPAIGN}:{recipient_id}", **(headers or {})}
    async with session.post(fp.url, json=_body(address, recipient_id), headers=all_headers) as resp:
        data: Any = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, data, resp.headers


async def test_accepts_and_records_the_request(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    status, data, _ = await _send(session, fp, "a@example.com", 1, headers={"Authorization": "Bearer xyz"})

    assert status == 200
    assert data["id"].startswith("fake-")
    [acc] = fp.accepted()
    assert isinstance(acc, Accepted)
    assert (acc.key, acc.address, acc.campaign_id, acc.recipient_id) == (
        f"{CAMPAIGN}:1",
        "a@example.com",
        CAMPAIGN,
        1,
    )
    assert acc.body["message"] == {"text": "hi"}
    assert fp.last_headers["Authorization"] == "Bearer xyz"
    assert fp.last_headers["Idempotency-Key"] == f"{CAMPAIGN}:1"
    assert fp.request_count() == 1
    assert fp.requests_by_address("a@example.com") == 1


async def test_same_key_is_answered_with_the_first_id_and_not_accepted_twice(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    _, first, _ = await _send(session, fp, "a@example.com", 1)
    _, second, _ = await _send(session, fp, "a@example.com", 1)
    _, third, _ = await _send(session, fp, "a@example.com", 1)

    assert first["id"] == second["id"] == third["id"]
    assert fp.accepted_count() == 1
    assert fp.duplicate_keys() == {f"{CAMPAIGN}:1": 2}
    assert fp.request_count() == 3


async def test_concurrent_requests_with_one_key_are_accepted_once(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    # The latency parks all of them past the first duplicate check, so only the final check dedups.
    fp.behaviour = Behaviour(latency_seconds=0.05)
    results = await asyncio.gather(*(_send(session, fp, "a@example.com", 1) for _ in range(5)))

    assert len({data["id"] for _, data, _ in results}) == 1
    assert fp.accepted_count() == 1
    assert fp.duplicate_keys() == {f"{CAMPAIGN}:1": 4}


async def test_exact_rule_with_times_then_acceptance(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour.rules["flaky@example.com"] = Rule(status=503, headers={"Retry-After": "2"}, times=2)

    first = await _send(session, fp, "flaky@example.com", 1)
    second = await _send(session, fp, "flaky@example.com", 1)
    third = await _send(session, fp, "flaky@example.com", 1)
    other = await _send(session, fp, "other@example.com", 2)

    assert [first[0], second[0], third[0]] == [503, 503, 200]
    assert first[2]["Retry-After"] == "2"
    assert other[0] == 200
    assert fp.requests_by_address("flaky@example.com") == 3
    assert [a.address for a in fp.accepted()] == ["flaky@example.com", "other@example.com"]


async def test_rule_bodies_json_text_and_empty(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    fp.behaviour.rules = {
        "json@x": Rule(status=400, body={"error": {"code": "invalid_address", "message": "no"}}),
        "html@x": Rule(status=502, body="<html>bad gateway</html>"),
        "empty@x": Rule(status=500),
    }

    json_status, json_data, _ = await _send(session, fp, "json@x", 1)
    html_status, html_data, html_headers = await _send(session, fp, "html@x", 2)
    empty_status, empty_data, _ = await _send(session, fp, "empty@x", 3)

    assert (json_status, json_data["error"]["code"]) == (400, "invalid_address")
    assert (html_status, html_data) == (502, "<html>bad gateway</html>")
    assert html_headers["Content-Type"].startswith("text/html")
    assert (empty_status, empty_data) == (500, "")
    assert fp.accepted_count() == 0


async def test_prefix_rule_first_match_wins_after_exact_rules(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour.fail_prefix_rules = {
        "bounce": Rule(status=400, body={"error": {"code": "bounced", "message": "x"}}),
        "b": Rule(status=403),
    }
    fp.behaviour.rules["bounce-but-exact@x"] = Rule(status=410)

    statuses = [
        (await _send(session, fp, "bounce-1@x", 1))[0],
        (await _send(session, fp, "bob@x", 2))[0],
        (await _send(session, fp, "bounce-but-exact@x", 3))[0],
        (await _send(session, fp, "alice@x", 4))[0],
    ]

    assert statuses == [400, 403, 410, 200]
    assert [a.address for a in fp.accepted()] == ["alice@x"]


async def test_all_status_answers_every_request(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    fp.behaviour.all_status = 401

    status, data, _ = await _send(session, fp, "a@x", 1)

    assert status == 401
    assert data == {"error": {"code": "forced", "message": "forced status"}}
    assert fp.accepted_count() == 0
    assert fp.request_count() == 1


async def test_required_headers(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    fp.behaviour.required_headers = {"Authorization": "Bearer xyz"}

    missing = await _send(session, fp, "a@x", 1)
    wrong = await _send(session, fp, "a@x", 1, headers={"Authorization": "Bearer nope"})
    right = await _send(session, fp, "a@x", 1, headers={"Authorization": "Bearer xyz"})

    assert (missing[0], missing[1]["error"]["code"]) == (401, "unauthorized")
    assert wrong[0] == 401
    assert right[0] == 200
    assert fp.accepted_count() == 1


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (b"not json", {"Idempotency-Key": "k"}),
        (b"[1, 2]", {"Idempotency-Key": "k"}),
        (b'{"to": 5}', {"Idempotency-Key": "k"}),
        (b'{"to": "a@x"}', {}),
        (b"", {"Idempotency-Key": "k"}),
    ],
)
async def test_malformed_request_is_400(
    fp: FakeProvider, session: aiohttp.ClientSession, raw: bytes, headers: dict[str, str]
) -> None:
    async with session.post(fp.url, data=raw, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_request"
    assert fp.accepted_count() == 0
    assert fp.request_count() == 1


async def test_any_path_is_served(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    url = fp.url.removesuffix("/send") + "/v2/messages"
    async with session.post(url, json=_body("a@x", 1), headers={"Idempotency-Key": "k"}) as resp:
        assert resp.status == 200
    assert fp.accepted_count() == 1


async def test_random_failures_are_reproducible_with_a_seed(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    async def run(tag: str) -> list[int]:
        return [(await _send(session, fp, f"r{i}@x", i, key=f"{tag}:{i}"))[0] for i in range(40)]

    fp.behaviour = Behaviour(transient_rate=0.3, throttle_rate=0.3, seed=42)
    first = await run("a")
    fp.reset()
    after_reset = await run("b")
    fp.behaviour = Behaviour(transient_rate=0.3, throttle_rate=0.3, seed=42)
    after_swap = await run("c")

    assert first == after_reset == after_swap
    assert {200, 429, 503} <= set(first)


async def test_random_throttle_sets_retry_after(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    fp.behaviour = Behaviour(throttle_rate=1.0, throttle_retry_after="7")

    status, _, headers = await _send(session, fp, "a@x", 1)

    assert (status, headers["Retry-After"]) == (429, "7")


async def test_abandoned_request_is_not_accepted(fp: FakeProvider, session: aiohttp.ClientSession) -> None:
    fp.behaviour.latency_seconds = 0.3

    with pytest.raises(asyncio.TimeoutError):
        await _send_with_timeout(session, fp, 0.05)
    # Past the latency, so a handler that was not cancelled would have accepted by now.
    await asyncio.sleep(0.35)

    assert fp.cancelled_count() == 1
    assert fp.accepted_count() == 0
    assert fp.request_count() == 1
    fp.behaviour.latency_seconds = 0.0
    assert (await _send(session, fp, "a@x", 1))[0] == 200


async def _send_with_timeout(session: aiohttp.ClientSession, fp: FakeProvider, client_timeout: float) -> None:
    async with session.post(
        fp.url,
        json=_body("a@x", 1),
        headers={"Idempotency-Key": f"{CAMPAIGN}:1"},
        timeout=aiohttp.ClientTimeout(total=client_timeout),
    ) as resp:
        await resp.read()


async def test_addresses_delivered_under_several_keys(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    await _send(session, fp, "twice@x", 1, key="c1:1")
    await _send(session, fp, "twice@x", 1, key="c2:1")
    await _send(session, fp, "once@x", 2, key="c1:2")
    await _send(session, fp, "once@x", 2, key="c1:2")

    assert fp.addresses_delivered_under_several_keys() == {"twice@x": ["c1:1", "c2:1"]}


async def test_reset_forgets_records_but_keeps_behaviour(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour.rules["a@x"] = Rule(status=400)
    await _send(session, fp, "a@x", 1)
    await _send(session, fp, "b@x", 2)

    fp.reset()

    assert (fp.request_count(), fp.accepted_count(), fp.requests_by_address("a@x")) == (0, 0, 0)
    assert fp.request_times() == []
    assert (await _send(session, fp, "a@x", 1))[0] == 400


def test_max_in_window_pure() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([5.0], 1.0) == 1
    # Half-open window: 0.0 and 1.0 do not share a one-second window.
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_in_window([0.0, 0.2, 0.4, 0.99, 1.5, 1.6, 1.7, 1.8, 1.95], 1.0) == 6
    assert max_in_window([3.0, 0.1, 2.5, 0.2, 2.9, 0.3, 2.95], 0.5) == 3
    assert max_in_window([0.0, 0.0, 0.0], 0.001) == 3


def test_max_requests_in_window_uses_recorded_times() -> None:
    fp = FakeProvider()
    for t in [10.0, 10.1, 10.2, 11.05, 11.1, 13.0]:
        fp._record_request_time(t)

    assert fp.request_count() == 6
    assert fp.max_requests_in_window(1.0) == 3
    assert fp.max_requests_in_window(0.15) == 2
    assert fp.max_requests_in_window(5.0) == 6


def test_start_in_thread_with_a_synchronous_client() -> None:
    fp = FakeProvider(Behaviour(rules={"bad@x": Rule(status=400, body={"error": {"code": "nope"}})}))
    fp.start_in_thread()
    try:

        def post(address: str, key: str) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(
                fp.url,
                data=json.dumps(_body(address, 1)).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                with err:
                    return err.code, json.loads(err.read())

        ok = post("a@x", "k1")
        again = post("a@x", "k1")
        bad = post("bad@x", "k2")
    finally:
        fp.stop_thread()

    assert ok[0] == 200 and again == ok
    assert bad == (400, {"error": {"code": "nope"}})
    assert fp.accepted_count() == 1
    assert fp.duplicate_keys() == {"k1": 1}
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(fp.url, data=b"{}", timeout=1)


async def test_requests_are_recorded_by_path_with_the_status_answered(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour.rules["bad@x"] = Rule(status=400)
    base = fp.url.removesuffix("/send")
    for path, address in (("/sms", "a@x"), ("/push", "b@x"), ("/sms", "bad@x")):
        async with session.post(base + path, json=_body(address, 1), headers={"Idempotency-Key": address}):
            pass

    assert len(fp.request_times("/sms")) == 2 and len(fp.request_times("/push")) == 1
    assert fp.request_times() == sorted(fp.request_times("/sms") + fp.request_times("/push"))
    assert fp.answers() == {200: 2, 400: 1}
    by_path = {a.path: a for a in fp.accepted()}
    assert set(by_path) == {"/sms", "/push"}
    assert by_path["/sms"].arrived <= by_path["/sms"].at
    assert by_path["/sms"].message_id.startswith("fake-")


async def test_storms_confine_random_throttling_to_their_windows(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour = Behaviour(throttle_rate=1.0, storm_every_seconds=0.6, storm_seconds=0.3)
    statuses: list[int] = []
    for i in range(24):
        statuses.append((await _send(session, fp, f"s{i}@x", i))[0])
        await asyncio.sleep(0.05)

    # Half of each period is calm: some requests are accepted, the others are throttled.
    assert {200, 429} == set(statuses)


async def test_stalled_answer_outlasts_the_client_and_is_not_accepted(
    fp: FakeProvider, session: aiohttp.ClientSession
) -> None:
    fp.behaviour = Behaviour(timeout_rate=1.0, timeout_seconds=5.0)

    with pytest.raises(asyncio.TimeoutError):
        await _send_with_timeout(session, fp, 0.2)
    await asyncio.sleep(0.1)

    assert (fp.accepted_count(), fp.cancelled_count(), fp.answers()) == (0, 1, {})


def test_behaviour_from_dict_builds_rules() -> None:
    behaviour = behaviour_from_dict(
        {
            "latency_seconds": 0.1,
            "fail_prefix_rules": {"+1999": {"status": 400, "body": {"error": {"code": "invalid_number"}}}},
            "timeout_rate": 0.01,
        }
    )

    assert behaviour.fail_prefix_rules["+1999"] == Rule(
        status=400, body={"error": {"code": "invalid_number"}}
    )
    assert (behaviour.latency_seconds, behaviour.timeout_rate) == (0.1, 0.01)


def test_provider_process_takes_its_behaviour_and_reports_its_records() -> None:
    import subprocess
    import sys

    behaviour = {"fail_prefix_rules": {"bad": {"status": 400}}}
    process = subprocess.Popen(
        [sys.executable, "-m", "campaignd.fakeprovider", "--behaviour", json.dumps(behaviour)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()

        def post(address: str) -> int:
            req = urllib.request.Request(
                url,
                data=json.dumps(_body(address, 1)).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": address},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                with err:
                    return int(err.code)

        assert (post("good@x"), post("bad@x"), post("good@x")) == (200, 400, 200)
        with urllib.request.urlopen(url.removesuffix("/send") + RECORDS_PATH, timeout=5) as resp:
            records = json.loads(resp.read())
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    assert records["request_paths"] == ["/send"] * 3
    assert records["answers"] == {"200": 2, "400": 1}
    assert records["duplicates"] == {"good@x": 1}
    [accepted] = records["accepted"]
    assert (accepted["address"], accepted["path"]) == ("good@x", "/send")
    assert accepted["message_id"].startswith("fake-") and accepted["arrived"] <= accepted["at"]


async def test_clients_connecting_while_the_threaded_server_stops_leak_no_socket() -> None:
    # Daemons may be reconnecting at the moment a test stops its fake. A connection accepted
    # in the loop turn that closes the server used to be left unwrapped (Python 3.11's
    # asyncio) and its socket surfaced later as a ResourceWarning in whichever test the
    # garbage collector ran in.
    async def hammer(host: str, port: int, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.001)
                continue
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await asyncio.sleep(0.001)
            writer.close()

    leaked: list[str] = []
    for _ in range(10):
        provider = FakeProvider()
        provider.start_in_thread()
        host, port = provider.url.split("//")[1].split("/")[0].rsplit(":", 1)
        stopping = asyncio.Event()
        clients = [asyncio.create_task(hammer(host, int(port), stopping)) for _ in range(30)]
        await asyncio.sleep(0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            await asyncio.to_thread(provider.stop_thread)
            stopping.set()
            await asyncio.gather(*clients)
            gc.collect()
        leaked += [str(w.message) for w in caught if f"'127.0.0.1', {port})" in str(w.message)]
    assert leaked == []
