"""A lean HTTP/1.1 client on asyncio protocols, for talking JSON to one server fast.

    pool = Pool("http://127.0.0.1:8000/v1", headers={"Content-Type": "application/json"}, limit=64)
    status, headers, body = await pool.request("POST", "/chat/completions", payload, timeout=60)
    await pool.close()

Why not aiohttp: a bare aiohttp loop spends about 90 µs of CPU per small request on this
machine (request and response objects, a timer context, the cookie jar, tracing hooks),
which caps one client at about 10,000 requests/s before the engine has done anything.
A local vLLM server answers faster than that. This client does only what talking to an
OpenAI-compatible server needs, for a fraction of the cost (bench/bench_throughput.py,
`wire_bare` against `aiohttp_orjson`):

- keep-alive connections, at most `limit` open, reused last-in first-out;
- http and https (the system's trusted CAs, hostname checked);
- response bodies framed by Content-Length, chunked transfer coding, or the close of the
  connection; 1xx interim responses skipped; `Connection: close` honoured;
- one deadline per request (connect, send and receive), one timer handle each.

It never retries: a request on a connection the server dropped raises ProtocolError (an
OSError), and the runner's retries, with their accounting, decide what happens next. A
kept-alive connection the server closes while idle leaves the pool when its FIN arrives.

Not here, by design: proxies, redirects, cookies, compression, request streaming,
HTTP/2. The OpenAI backend uses aiohttp whenever a proxy is configured for the host.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # bytes of status line and headers before the response is refused as malformed


class ProtocolError(ConnectionError):
    """The server's bytes are not an HTTP/1.1 response, or it closed the connection mid-response."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.buffer = bytearray()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.length = -1  # body bytes still expected; -1: not known yet
        self.chunked = False
        self.until_close = False
        self.body = bytearray()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Bytes nobody asked for (or after a timeout): this connection's framing is lost.
            self.close()
            return
        self.buffer += data
        try:
            self._parse()
        except (ValueError, IndexError, ProtocolError) as e:
            self._fail(e if isinstance(e, ProtocolError) else ProtocolError(f"malformed HTTP response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.until_close and self.status:
                self._finish(bytes(self.body))
            else:
                reason = f": {exc}" if exc else ""
                self._fail(ProtocolError(f"server closed the connection before the response was complete{reason}"))

    # --- a request ------------------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self._reset()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        if self.buffer:  # bytes past the end of the response: the next one could not be framed
            self.keep_alive = False
            self.buffer.clear()
        if not self.keep_alive:
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, self.headers, body))

    def _parse(self) -> None:
        buf = self.buffer
        while not self.status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError(f"response headers longer than {MAX_HEAD} bytes")
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            del buf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            status = rest[:3]
            if not version.startswith("HTTP/1.") or not status.isdigit():
                raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            code = int(status)
            if 100 <= code < 200:  # interim (100 Continue, 103 Early Hints): the real response follows
                continue
            headers = self.headers
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            connection = headers.get("connection", "").lower()
            self.keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.chunked = True
            elif "content-length" in headers:
                self.length = int(headers["content-length"])
            elif code in (204, 304):
                self.length = 0
            else:
                self.until_close, self.keep_alive = True, False
            self.status = code
        if self.chunked:
            self._parse_chunks()
        elif self.length >= 0 and len(buf) >= self.length:
            body = bytes(buf[:self.length])
            del buf[:self.length]
            self._finish(body)
        elif self.until_close:
            self.body += buf
            buf.clear()

    def _parse_chunks(self) -> None:
        buf = self.buffer
        while True:
            if self.length > 0:  # inside a chunk: its data, then CRLF
                if len(buf) < self.length + 2:
                    return
                self.body += buf[:self.length]
                del buf[:self.length + 2]
                self.length = -1
            if self.length == 0:  # after the last chunk: optional trailers, then an empty line
                end = buf.find(b"\r\n")
                while end > 0:  # a trailer line; skip it
                    del buf[:end + 2]
                    end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:2]
                self._finish(bytes(self.body))
                return
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("chunk size line too long")
                return
            self.length = int(buf[:end].split(b";", 1)[0].strip(), 16)
            del buf[:end + 2]


class Pool:
    """Keep-alive connections to the origin of `base_url` (scheme, host, port), at most `limit` open
    at once. Request paths are appended to the base URL's own path ("/v1" in ".../v1")."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, limit: int = 64,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_path = parts.path.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.limit = max(1, limit)
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"Host: {host if default_port else f'{host}:{self.port}'}",
                 "Accept: application/json", "User-Agent: retort"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def request(self, method: str, path: str, body: bytes = b"", *,
                      timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, lower-cased headers, body).

        Raises TimeoutError past `timeout` seconds (connecting included), OSError (ConnectionError,
        ssl.SSLError, ProtocolError, …) when the connection fails.
        """
        loop = asyncio.get_running_loop()
        data = b"%s %s%s HTTP/1.1\r\n%s\r\nContent-Length: %d\r\n\r\n%s" % (
            method.encode(), self.base_path.encode(), path.encode(), self._head, len(body), body)
        deadline = None if timeout is None else loop.time() + timeout
        await self._slot()
        try:
            conn = await self._connection(loop, deadline)
            try:
                return await self._exchange(loop, conn, data, deadline)
            finally:
                self._release(conn)
        finally:
            self._open_slot()

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    # --- internals ------------------------------------------------------------------------

    async def _exchange(self, loop: asyncio.AbstractEventLoop, conn: _Connection, data: bytes,
                        deadline: float | None) -> tuple[int, dict[str, str], bytes]:
        waiter = conn.send(data)
        if deadline is None:
            return await waiter
        timer = loop.call_at(deadline, _expire, conn, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def _connection(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            async with asyncio.timeout(remaining):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None)
        except TimeoutError:
            raise TimeoutError(f"could not connect to {self.host}:{self.port} in time") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._closed or conn.waiter is None or not conn.waiter.done() \
                or conn.waiter.cancelled() or conn.waiter.exception() is not None:
            conn.close()
        else:
            self._idle.append(conn)

    async def _slot(self) -> None:
        """Wait until fewer than `limit` requests are in flight."""
        if self._open < self.limit and not self._waiters:
            self._open += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _open_slot hands its slot over: _open stays as it is
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._open_slot()  # handed a slot while being cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def _open_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1


def _expire(conn: _Connection, waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response in time"))
        conn.close()
