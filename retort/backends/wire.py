"""A lean HTTP/1.1 client on asyncio protocols, for talking JSON to one server fast.

    pool = Pool("http://127.0.0.1:8000/v1", headers={"Content-Type": "application/json"}, limit=64)
    status, headers, body = await pool.request("POST", "/chat/completions", payload, timeout=60)
    await pool.close()

Why not aiohttp: a bare aiohttp loop spends about 90 µs of CPU per small request on this
machine (request and response objects, a timer context, the cookie jar, tracing hooks),
which caps one client at about 10,000 requests/s before the engine has done anything.
A local vLLM server answers faster than that. This client does only what talking to an
OpenAI-compatible server needs, for a fraction of the cost (bench/bench_throughput.py,
`wire_bare` against `aiohttp_orjson`). docs/http.md has the figures and the full list.

- keep-alive connections, at most `limit` open, reused last-in first-out; http and https
  (the system's trusted CAs, hostname checked); one deadline per request, redirects included;
- responses parsed by llhttp (httptools), Node's parser: Content-Length, chunked, read to
  the close, 1xx interim responses skipped, `Connection: close` honoured;
- 307/308 followed with the same method and body, 301/302/303 for GET only, at most
  `max_redirects` hops, to other origins too (their own connections, no Authorization);
- `Accept-Encoding: identity` asked, a gzip or deflate body decoded all the same;
- HTTP_PROXY / HTTPS_PROXY / ALL_PROXY (upper or lower case), minus NO_PROXY: an http://
  proxy, absolute-form requests for http URLs, a CONNECT tunnel for https;
- a body larger than `max_response` bytes (after decoding) fails with ResponseTooLarge.

Retries: exactly one case, on a fresh connection: a REUSED keep-alive connection that the
server closed before any byte of the response (its idle timeout crossing our request on
the wire). Anything else, a fresh connection dropped or a response cut short, raises
ProtocolError (an OSError) and the runner's retries, with their accounting, decide.

Not here, by design: cookies, request streaming, HTTP/2, SOCKS or https:// proxies.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import urllib.request
import zlib
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httptools

MAX_HEAD = 64 * 1024  # bytes of status line and headers before the response is refused as malformed
MAX_RESPONSE = 64 * 1024 * 1024  # default cap on a response body, in bytes (after decoding)
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SAFE = frozenset({"GET"})  # what a 301/302/303 may repeat; a POST would have to become a GET and lose its body

Response = tuple[int, dict[str, str], bytes]


class ProtocolError(ConnectionError):
    """The server's bytes are not an HTTP/1.1 response, or it closed the connection mid-response."""


class ResponseTooLarge(ProtocolError):
    """The response body is larger than the pool's `max_response`; the connection is discarded."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body larger than {_size(limit)}, the cap on response size")
        self.limit = limit


class _ClosedBeforeResponse(ProtocolError):
    """The connection closed with not one byte of the response received."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request in flight on it. Also llhttp's callback target."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_response: int) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[Response] | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.max_response = max_response
        self.requests = 0  # sent on this connection; more than one means it was reused
        self._reset()

    def _reset(self) -> None:
        self.status = 0  # the final (non-1xx) status, once its headers are complete
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.received = False  # any byte of a response to this request
        self.head_size = 0
        self.complete = False
        self.keep_alive = True
        self.failure: ProtocolError | None = None  # raised from a callback, to stop llhttp

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Bytes nobody asked for (or after a timeout): this connection's framing is lost.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:  # an upgrade (101) is not ours
            if not self.complete:
                where = "body" if self.status else "status line or headers"
                self._fail(self.failure or ProtocolError(f"malformed HTTP response ({where}): {e}"))
                self.close()
                return
            self.keep_alive = False  # garbage after a whole response: the next one could not be framed
        if self.complete:
            self._finish()
        elif not self.status:  # llhttp sets no bound on headers: this is ours
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._fail(ProtocolError(f"response headers longer than {MAX_HEAD} bytes"))
                self.close()

    def eof_received(self) -> None:
        self.closed = True  # the server is done with us: out of the pool now, not when the close completes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        headers = self.headers
        if exc is None and self.status and "content-length" not in headers \
                and "chunked" not in headers.get("transfer-encoding", "").lower():
            self.keep_alive = False  # framed by a clean close (not a reset): this is its end
            self._finish()
            return
        reason = f": {exc}" if exc else ""
        if not self.received:
            self._fail(_ClosedBeforeResponse(f"server closed the connection before responding{reason}"))
        else:
            self._fail(ProtocolError(f"server closed the connection before the response was complete{reason}"))

    # --- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same bytes: nobody asked for it
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the real response follows
            self.headers = {}
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_response:
            self.failure = ResponseTooLarge(self.max_response)
            raise self.failure

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_response:
            self.failure = ResponseTooLarge(self.max_response)
            raise self.failure
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.status:  # not an interim response's end
            self.complete = True

    # --- a request ------------------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.requests += 1
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

    def _finish(self) -> None:
        if not self.keep_alive:
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, self.headers, b"".join(self.body)))


class _Tunnel(asyncio.Protocol):
    """The first leg of a CONNECT through a proxy: reads the proxy's answer, then hands over to TLS."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if self.head.done():
            return
        if end >= 0:
            self.head.set_result(bytes(self.buffer[:end]))
        elif len(self.buffer) > MAX_HEAD:
            self.head.set_exception(ProtocolError("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ProtocolError(f"the proxy closed the connection during CONNECT: {exc}"))


class Pool:
    """Keep-alive connections to the origin of `base_url` (scheme, host, port), at most `limit` open
    at once. Request paths are appended to the base URL's own path ("/v1" in ".../v1").

    The proxy comes from the environment, read once here. `max_response` caps a response
    body in bytes. A redirect to another origin gets a pool of its own (kept in this one).
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, limit: int = 64,
                 ssl_context: ssl.SSLContext | None = None, max_response: int = MAX_RESPONSE,
                 max_redirects: int = MAX_REDIRECTS) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_path = parts.path.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.limit = max(1, limit)
        self.max_response = max_response
        self.max_redirects = max_redirects
        self._headers = dict(headers or {})
        self._ssl_given = ssl_context
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        lines = [f"Host: {self.authority}", "Accept: application/json", "Accept-Encoding: identity",
                 "User-Agent: retort"]
        lines += [f"{k}: {v}" for k, v in self._headers.items()]

        # Where to connect: the origin itself, or a proxy (absolute-form requests for http, CONNECT for https).
        self._address = (self.host, self.port)
        self._prefix = b""  # what precedes the path in the request line
        self._tunnel: bytes | None = None  # the CONNECT request, when tunnelling
        proxy = proxy_for(base_url)
        if proxy is not None:
            pparts = urlsplit(proxy)
            self._address = (pparts.hostname or "", pparts.port or 80)
            auth = ""
            if pparts.username is not None:
                token = base64.b64encode(f"{unquote(pparts.username)}:{unquote(pparts.password or '')}".encode())
                auth = f"Proxy-Authorization: Basic {token.decode()}\r\n"
            if self._ssl is None:
                self._prefix = f"http://{self.authority}".encode("latin-1")
                if auth:
                    lines.append(auth.rstrip("\r\n"))
            else:
                target = f"{host}:{self.port}"
                self._tunnel = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode("latin-1")
        self.proxy = proxy
        self._head = "\r\n".join(lines).encode("latin-1")
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._others: dict[tuple[str, str, int], Pool] = {}  # redirect targets on other origins
        self._closed = False

    async def request(self, method: str, path: str, body: bytes = b"", *, timeout: float | None = None) -> Response:
        """Send one request, following redirects; return (status, lower-cased headers, body).

        Raises TimeoutError past `timeout` seconds (connecting and redirects included), OSError
        (ConnectionError, ssl.SSLError, ProtocolError, ResponseTooLarge, …) when the exchange fails.
        Past `max_redirects` hops the last redirect response itself is returned. A gzip or deflate
        body comes back decoded; the headers are the ones received (Content-Encoding included).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pool, target = self, self.base_path + path
        status, headers, content = await self._fetch(loop, method, target, body, deadline)
        hops = 0
        while status in _REDIRECTS and hops < self.max_redirects and "location" in headers \
                and (status >= 307 or method in _SAFE):
            hops += 1
            followed = self._follow(pool, target, headers["location"])
            if followed is None:
                break
            pool, target = followed
            status, headers, content = await pool._fetch(loop, method, target, body, deadline)
        if "content-encoding" in headers:
            content = _decode(headers["content-encoding"], content, self.max_response)
        return status, headers, content

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for other in self._others.values():
            await other.close()
        self._others.clear()

    # --- internals ------------------------------------------------------------------------

    async def _fetch(self, loop: asyncio.AbstractEventLoop, method: str, target: str, body: bytes,
                     deadline: float | None) -> Response:
        """One request and its response on this origin: no redirects, no decoding."""
        data = b"%s %s%s HTTP/1.1\r\n%s\r\nContent-Length: %d\r\n\r\n%s" % (
            method.encode(), self._prefix, target.encode(), self._head, len(body), body)
        await self._slot()
        try:
            conn = await self._connection(loop, deadline)
            try:
                return await self._exchange(loop, conn, data, deadline)
            except _ClosedBeforeResponse:
                if conn.requests == 1:
                    raise  # a fresh connection: the server means it
                # A kept-alive connection the server closed as our request went out (its idle timeout
                # crossed us on the wire): it answered nothing, so send it once more on a new connection.
            finally:
                self._release(conn)
            conn = await self._connect(loop, deadline)
            try:
                return await self._exchange(loop, conn, data, deadline)
            finally:
                self._release(conn)
        finally:
            self._open_slot()

    def _follow(self, pool: Pool, target: str, location: str) -> tuple[Pool, str] | None:
        """The pool and request target a Location leads to; None if it leaves http(s)."""
        url = urljoin(f"{pool.scheme}://{pool.authority}{target}", location.strip())
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        new_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        origin = (parts.scheme, parts.hostname, port)
        if origin == (self.scheme, self.host, self.port):
            return self, new_target
        other = self._others.get(origin)
        if other is None:
            # Another origin: the key does not travel with us (requests and httpx drop it too).
            headers = {k: v for k, v in self._headers.items() if k.lower() != "authorization"}
            try:
                other = Pool(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", headers=headers, limit=self.limit,
                             ssl_context=self._ssl_given, max_response=self.max_response, max_redirects=0)
            except ValueError as e:  # a proxy it cannot use for that origin
                raise ProtocolError(f"redirected to {parts.scheme}://{parts.netloc}: {e}") from None
            self._others[origin] = other
        return other, new_target

    async def _exchange(self, loop: asyncio.AbstractEventLoop, conn: _Connection, data: bytes,
                        deadline: float | None) -> Response:
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
        return await self._connect(loop, deadline)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> _Connection:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        host, port = self._address
        try:
            async with asyncio.timeout(remaining):
                if self._tunnel is not None:
                    return await self._connect_tunnel(loop)
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_response), host, port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None)
        except TimeoutError:
            raise TimeoutError(f"could not connect to {host}:{port} in time") from None
        return conn

    async def _connect_tunnel(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        assert self._tunnel is not None and self._ssl is not None
        transport, tunnel = await loop.create_connection(lambda: _Tunnel(loop), *self._address)
        try:
            transport.write(self._tunnel)
            head = await tunnel.head
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            version, _, rest = status_line.partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:1] == "2":
                raise ProtocolError(f"proxy {_redacted(self.proxy)} refused CONNECT to {self.host}:{self.port}: "
                                    f"{status_line[:80]!r}")
            conn = _Connection(loop, self.max_response)
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self.host)
            if tls is None:
                raise ProtocolError("TLS through the proxy's tunnel failed")
            conn.connection_made(tls)
            return conn
        except BaseException:
            transport.close()
            raise

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


def proxy_for(url: str) -> str | None:
    """The http:// proxy the environment routes `url` through, or None.

    HTTP_PROXY or HTTPS_PROXY by the URL's scheme, else ALL_PROXY; lower case wins over upper
    case and NO_PROXY exempts hosts, as curl and urllib have it. A proxy this client cannot
    speak to (SOCKS, https://) is a ValueError, not silently ignored.
    """
    proxies = urllib.request.getproxies()
    if not proxies:
        return None
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # curl's reading of a bare host:port
    if urlsplit(proxy).scheme != "http" or not urlsplit(proxy).hostname:
        raise ValueError(f"the environment routes {parts.scheme} through the proxy {_redacted(proxy)}, but retort's "
                         f"fast HTTP client speaks only to http:// proxies; choose another transport (sdk) or "
                         f"exempt the host with NO_PROXY")
    return proxy


def _redacted(url: str | None) -> str:
    """A proxy URL without its user and password."""
    parts = urlsplit(url or "")
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _decode(coding: str, body: bytes, limit: int) -> bytes:
    """Undo a Content-Encoding we did not ask for (gzip, deflate), never growing past `limit`."""
    for name in reversed([c.strip().lower() for c in coding.split(",") if c.strip()]):
        if name == "identity":
            continue
        if name in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit)
        elif name == "deflate":
            try:  # the standard says zlib-wrapped; some servers send raw deflate
                body = _inflate(body, zlib.MAX_WBITS, limit)
            except zlib.error:
                body = _inflate(body, -zlib.MAX_WBITS, limit)
        else:
            raise ProtocolError(f"response in Content-Encoding {name!r}, which this client does not decode "
                                f"(it asks for identity)")
    return body


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        if wbits == zlib.MAX_WBITS:
            raise
        raise ProtocolError(f"malformed compressed body: {e}") from None
    if len(out) > limit:
        raise ResponseTooLarge(limit)
    if not inflater.eof:
        raise ProtocolError("compressed body ends before its end")
    return out


def _size(n: int) -> str:
    return f"{n / 2 ** 20:g} MiB" if n >= 2 ** 20 else f"{n} bytes"


def _expire(conn: _Connection, waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response in time"))
        conn.close()
