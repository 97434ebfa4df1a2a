"""A TCP proxy in front of PostgreSQL that can lose, or hold back, the server's reply to a
chosen statement.

The statement still runs, and outside a transaction block it commits; then the proxy drops
the connection instead of passing the reply on. The client sees its connection close in the
middle of the statement, and cannot tell whether it took effect: what a network fault or a
server crash between commit and reply does to a daemon, made to happen at a chosen moment.

It understands just enough of the wire protocol (v3) for that: it refuses SSL and GSS
encryption so that it can read the messages, tracks which statement each prepared name
stands for, and counts the executions (Bind messages, or simple queries) of each.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import Counter
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


class PgProxy:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        host = query.pop("host", None) or parts.hostname or "localhost"
        port = int(query.pop("port", None) or parts.port or 5432)
        self._unix_path = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._upstream = (host, port)
        self._url_parts = parts
        self._query = query
        self._target: str | None = None
        self._lose_execution = 0
        self._lose_every = 0
        self._delay: float | None = None
        # Set from the moment a delayed reply is complete and held back: ``holding`` until
        # it is passed on, ``held`` for good.
        self.holding = threading.Event()
        self.held = threading.Event()
        # hold_statement's: the run it holds, and ``statement_held`` set once it waits.
        self._hold_target: str | None = None
        self._hold_execution = 0
        self._hold_executions = 0
        self.statement_held = threading.Event()
        # freeze()'s: set, no byte passes either way and new connections are held.
        self.frozen = threading.Event()
        # strand()'s: connections opened before it (generation below this) pass nothing more.
        self._generation = 0
        self._stranded_below = 0
        self._released: asyncio.Event | None = None
        self._executions = 0
        self.lost = 0
        # Every statement run through the proxy, by its text: how many times.
        self.executed: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pgproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    def start(self) -> str:
        """Starts listening on a loopback port; returns the URL to connect through."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        port = self._server.sockets[0].getsockname()[1]
        user = self._url_parts.username or ""
        password = self._url_parts.password or ""
        credentials = f"{user}:{password}@" if user else ""
        self.url = urlunsplit(
            (
                self._url_parts.scheme,
                f"{credentials}127.0.0.1:{port}",
                self._url_parts.path,
                urlencode(self._query),
                "",
            )
        )
        return self.url

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            if self._released is not None:
                self._released.set()
            self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            if self.frozen.is_set() or self._stranded_below:
                # Held for good in _while_frozen: no closed socket wakes them.
                for handler in list(self._handlers):
                    handler.cancel()
            # Each connection's handler closes its sockets on its way out.
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def freeze(self) -> None:
        """From now on no byte passes either way, on any connection, and new connections are
        held: a server that stops answering without closing anything (frozen, partitioned)."""
        self.frozen.set()

    def strand(self) -> None:
        """From now on no byte passes either way on the connections open now, while new ones
        work: a partition, or a failover, that leaves a client's sockets open and silent."""

        async def strand() -> None:
            self._stranded_below = self._generation

        asyncio.run_coroutine_threadsafe(strand(), self._loop).result(timeout=10)

    async def _while_frozen(self, generation: int | None = None) -> None:
        stranded = generation is not None and generation < self._stranded_below
        if self.frozen.is_set() or stranded:
            await asyncio.Event().wait()  # for good: the proxy's stop() ends its handlers

    def lose_reply(self, query: str, *, execution: int, then_every: int = 0) -> None:
        """Lose the reply to the ``execution``-th run (from 1, counted across connections) of
        the statement whose text is exactly ``query``, and, with ``then_every``, to every
        ``then_every``-th run after it."""
        self._arm(query, execution, then_every, delay=None)

    def delay_reply(self, query: str, *, execution: int, seconds: float) -> None:
        """Hold the reply to that run of ``query`` for ``seconds`` once the server has sent it
        all (``holding`` and ``held`` are set then), and pass it on: the statement took effect
        long before its client learns the result."""
        self._arm(query, execution, 0, delay=seconds)

    def hold_statement(self, query: str, *, execution: int) -> None:
        """Hold that run of ``query`` (counted apart from the reply to lose or delay) before
        the server sees it, until :meth:`release`: the test changes the database meanwhile,
        as another client would between a daemon's decision and its write."""

        async def arm() -> None:
            self._hold_target, self._hold_execution, self._hold_executions = query, execution, 0
            self._released = asyncio.Event()

        asyncio.run_coroutine_threadsafe(arm(), self._loop).result(timeout=10)

    def release(self) -> None:
        """Let the held statement (or the next one to be held) go on to the server."""

        async def release() -> None:
            if self._released is not None:
                self._released.set()

        asyncio.run_coroutine_threadsafe(release(), self._loop).result(timeout=10)

    def _arm(self, query: str, execution: int, then_every: int, *, delay: float | None) -> None:
        async def arm() -> None:
            self._target, self._lose_execution, self._executions = query, execution, 0
            self._lose_every, self._delay = then_every, delay

        # Armed by the time this returns: the statement may run right after.
        asyncio.run_coroutine_threadsafe(arm(), self._loop).result(timeout=10)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        self._connections.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        generation = self._generation
        self._generation += 1
        try:
            await self._while_frozen()
            if self._unix_path is not None:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._unix_path)
            else:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            self._connections.add(upstream_writer)
            losing = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self._client_to_server(client_reader, client_writer, upstream_writer, losing, generation)
                )
                group.create_task(
                    self._server_to_client(
                        upstream_reader, client_writer, upstream_writer, losing, generation
                    )
                )
        except* (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except* asyncio.CancelledError:
            # stop()'s, of a connection held for good: ended quietly, as a closed one does.
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._connections.discard(writer)
                    writer.transport.abort()

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        losing: asyncio.Event,
        generation: int,
    ) -> None:
        # Startup: untyped messages, a length and a code first.
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            rest = await reader.readexactly(length - 8)
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                client_writer.write(b"N")
                await client_writer.drain()
                continue
            upstream.write(head + rest)
            await upstream.drain()
            if code == _CANCEL_REQUEST:
                return
            break
        statements: dict[bytes, bytes] = {}
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await reader.readexactly(length - 4)
            executed: bytes | None = None
            if kind == b"P":
                name, query = body.split(b"\0")[:2]
                statements[name] = query
            elif kind == b"B":
                executed = statements.get(body.split(b"\0")[1])
            elif kind == b"Q":
                executed = body[:-1]
            if executed is not None:
                text = executed.decode()
                self.executed[text] += 1
                if text == self._target:
                    self._executions += 1
                    since = self._executions - self._lose_execution
                    if since == 0 or (since > 0 and self._lose_every and since % self._lose_every == 0):
                        losing.set()
                if text == self._hold_target:
                    self._hold_executions += 1
                    if self._hold_executions == self._hold_execution and self._released is not None:
                        self.statement_held.set()
                        await self._released.wait()
            await self._while_frozen(generation)
            upstream.write(head + body)
            await upstream.drain()

    async def _server_to_client(
        self,
        reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        losing: asyncio.Event,
        generation: int,
    ) -> None:
        held: list[bytes] = []
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await reader.readexactly(length - 4)
            await self._while_frozen(generation)
            if not losing.is_set():
                client_writer.write(head + body)
                await client_writer.drain()
                continue
            if self._delay is not None:
                held.append(head + body)
                if kind == b"Z":
                    self.holding.set()
                    self.held.set()
                    await asyncio.sleep(self._delay)
                    losing.clear()
                    self.holding.clear()
                    client_writer.write(b"".join(held))
                    held.clear()
                    await client_writer.drain()
                continue
            # Dropped from the moment the armed statement was bound, until ReadyForQuery: the
            # server is done with it then (committed, outside a transaction block).
            if kind == b"Z":
                self.lost += 1
                client_writer.transport.abort()
                upstream.transport.abort()
                raise ConnectionResetError("reply lost on purpose")
