"""retort.backends.wire: the HTTP/1.1 client, against raw servers that send exact bytes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import shutil
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from retort.backends.base import Request
from retort.backends.openai import OpenAIBackend, from_config
from retort.backends.wire import MAX_REDIRECTS, Pool, ProtocolError, ResponseTooLarge
from retort.errors import BackendError
from retort.spec import OpenAIModel

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def serve(handler: Handler, check: Callable[[Pool], Awaitable[None]], *,
          ssl_server: ssl.SSLContext | None = None, ssl_client: ssl.SSLContext | None = None,
          limit: int = 8, **pool_options: Any) -> list[int]:
    """Run `handler` as a server on 127.0.0.1 (given each connection's index) and `check` against it.

    Returns the number of requests each connection carried.
    """
    per_connection: list[int] = []

    async def main() -> None:
        server, port = await listen(handler, per_connection, ssl_server)
        scheme = "https" if ssl_server else "http"
        host = "localhost" if ssl_server else "127.0.0.1"
        pool = Pool(f"{scheme}://{host}:{port}", headers={"Content-Type": "application/json"}, limit=limit,
                    ssl_context=ssl_client, **pool_options)
        try:
            await check(pool)
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())
    return per_connection


async def listen(handler: Handler, per_connection: list[int] | None = None,
                 ssl_server: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    """Start `handler` as a server on 127.0.0.1; return it and its port. Appends to `per_connection` per connection."""
    connections = [] if per_connection is None else per_connection

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(connections)
        connections.append(0)
        try:
            await handler(reader, writer, index)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_server)
    return server, server.sockets[0].getsockname()[1]


def counting(respond: Callable[[str, bytes], bytes]) -> Handler:
    """A keep-alive server that answers each request with `respond(request line, body)`."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            line, _, body = await read_request(reader)
            writer.write(respond(line, body))
            await writer.drain()
    return handler


def ok(body: bytes, extra: str = "") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra.encode(), len(body), body)


def test_requests_are_sent_whole_and_connections_reused() -> None:
    seen: list[tuple[str, bytes]] = []

    def respond(line: str, body: bytes) -> bytes:
        seen.append((line, body))
        return ok(b'{"echo": %s}' % body)

    async def check(pool: Pool) -> None:
        for i in range(5):
            status, headers, content = await pool.request("POST", "/v1/chat", b'"%d"' % i, timeout=5)
            assert (status, headers["content-type"], content) == (200, "application/json", b'{"echo": "%d"}' % i)

    per_connection = serve(counting(respond), check)
    assert seen == [("POST /v1/chat HTTP/1.1", b'"%d"' % i) for i in range(5)]
    assert len(per_connection) == 1  # one keep-alive connection carried all five


def test_concurrent_requests_stay_within_the_limit() -> None:
    open_now = [0]
    peak = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])
        try:
            while True:
                _, _, body = await read_request(reader)
                await asyncio.sleep(0.01)
                writer.write(ok(body))
                await writer.drain()
        finally:
            open_now[0] -= 1

    async def check(pool: Pool) -> None:
        results = await asyncio.gather(*(pool.request("POST", "/", b"%d" % i, timeout=5) for i in range(40)))
        assert [r[2] for r in results] == [b"%d" % i for i in range(40)]

    serve(handler, check, limit=4)
    assert peak[0] == 4


def test_chunked_bodies_with_extensions_and_trailers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        # Sent in small pieces, so the parser sees every split point.
        payload = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n")
        for i in range(0, len(payload), 3):
            writer.write(payload[i:i + 3])
            await writer.drain()
            await asyncio.sleep(0)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", timeout=5))[2] == b"hello world"
        assert (await pool.request("POST", "/", timeout=5))[2] == b"abc"  # same connection, framed right

    assert len(serve(handler, check)) == 1


def test_interim_responses_and_read_until_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", timeout=5))[:2] == (200, {})
        assert (await pool.request("POST", "/", timeout=5))[2] == b"all of it"

    assert len(serve(handler, check)) == 2  # no length, so the connection could not be kept


def test_connection_close_is_honoured() -> None:
    per_connection = serve(counting(lambda line, body: ok(b"{}", "Connection: close\r\n")),
                           lambda pool: _times(pool, 3))
    assert len(per_connection) == 3


async def _times(pool: Pool, n: int) -> None:
    for _ in range(n):
        assert (await pool.request("GET", "/", timeout=5))[0] == 200


def test_a_fresh_connection_dropped_mid_response_fails() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="closed the connection"):
            await pool.request("POST", "/", timeout=5)

    assert len(serve(handler, check)) == 1


def test_a_response_past_the_deadline_times_out_and_the_pool_recovers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            _, _, body = await read_request(reader)
            if body == b"slow":
                await asyncio.sleep(1)
            writer.write(ok(body))
            await writer.drain()

    async def check(pool: Pool) -> None:
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", b"slow", timeout=0.1)
        assert (await pool.request("POST", "/", b"fast", timeout=5))[2] == b"fast"

    assert len(serve(handler, check)) == 2  # the timed-out connection was not reused


def test_garbage_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="status line"):
            await pool.request("POST", "/", timeout=5)

    serve(handler, check)


def test_refused_connection_raises_oserror() -> None:
    async def main() -> None:
        pool = Pool("http://127.0.0.1:9")
        with pytest.raises(OSError):
            await pool.request("POST", "/", timeout=5)
        assert pool._open == 0  # the slot was given back

    asyncio.run(main())


def certificate(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for localhost: the server's context, and a client context trusting it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return server_ctx, ssl.create_default_context(cafile=str(cert))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_verified_certificate(tmp_path: Path) -> None:
    server_ctx, client_ctx = certificate(tmp_path)

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"secret", timeout=5))[2] == b"secret"

    serve(counting(lambda line, body: ok(body)), check, ssl_server=server_ctx, ssl_client=client_ctx)

    async def untrusted(pool: Pool) -> None:  # the system CAs do not trust a self-signed certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            await pool.request("POST", "/", b"secret", timeout=5)

    serve(counting(lambda line, body: ok(body)), untrusted, ssl_server=server_ctx)


def test_bytes_past_the_announced_length_retire_the_connection() -> None:
    per_connection = serve(counting(lambda line, body: ok(b"{}") + b"HTTP/1.1 200 OK\r\n"),
                           lambda pool: _times(pool, 2))
    assert len(per_connection) == 2  # the second request could not trust the first connection's framing


def test_headers_past_the_bound_are_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000)
        await writer.drain()
        await reader.read()

    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="headers longer than"):
            await pool.request("GET", "/", timeout=5)

    serve(handler, check)


# --- the keep-alive race: one retry, on a fresh connection, only when no response byte came ---------------------

def close_now(writer: asyncio.StreamWriter, how: str) -> None:
    """Close as a server whose keep-alive timeout fires: a FIN, or (SO_LINGER 0) a reset."""
    if how == "reset":
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_reused_connection_closed_before_any_byte_is_retried_once_on_a_fresh_one(how: str) -> None:
    # Connection 0 answers "a", then closes exactly when "b" arrives on it, with no byte of an answer:
    # the moment a server's idle timeout crosses the client's next request.
    seen: list[tuple[bytes, int]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            _, _, body = await read_request(reader)
            seen.append((body, index))
            if index == 0 and body == b"b":
                close_now(writer, how)
                return
            writer.write(ok(body + b"@%d" % index))
            await writer.drain()

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"a", timeout=5))[2] == b"a@0"
        assert (await pool.request("POST", "/", b"b", timeout=5))[2] == b"b@1"
        assert (await pool.request("POST", "/", b"c", timeout=5))[2] == b"c@1"  # the new one is kept

    assert len(serve(handler, check)) == 2
    assert seen == [(b"a", 0), (b"b", 0), (b"b", 1), (b"c", 1)]


def test_the_retry_is_only_once_and_a_fresh_connection_is_never_retried() -> None:
    # Connection 0 answers "a" and drops "b"; every later connection drops its first request unanswered.
    seen: list[tuple[bytes, int]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        _, _, body = await read_request(reader)
        seen.append((body, index))
        if index == 0:
            writer.write(ok(b"a"))
            await writer.drain()
            _, _, body = await read_request(reader)
            seen.append((body, index))
        close_now(writer, "fin")

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"a", timeout=5))[2] == b"a"
        with pytest.raises(ProtocolError, match="before responding"):
            await pool.request("POST", "/", b"b", timeout=5)  # reused, dropped; retried fresh, dropped: done
        with pytest.raises(ProtocolError, match="before responding"):
            await pool.request("POST", "/", b"c", timeout=5)  # fresh, dropped: not retried

    assert len(serve(handler, check)) == 3
    assert seen == [(b"a", 0), (b"b", 0), (b"b", 1), (b"c", 2)]


def test_no_retry_once_a_response_byte_arrived() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        _, _, body = await read_request(reader)
        seen.append(body)
        writer.write(ok(b"a"))
        await writer.drain()
        _, _, body = await read_request(reader)
        seen.append(body)
        writer.write(b"H")  # one byte of an answer: the server may have acted on the request
        await writer.drain()
        close_now(writer, "fin")

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"a", timeout=5))[2] == b"a"
        with pytest.raises(ProtocolError, match="before the response was complete"):
            await pool.request("POST", "/", b"b", timeout=5)

    assert len(serve(handler, check)) == 1
    assert seen == [b"a", b"b"]


def test_a_connection_closed_while_idle_leaves_the_pool() -> None:
    # The server closes right after answering; whether the client sees the FIN before its next request
    # (the pool skips the connection) or after (the retry), each request reaches the server once.
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        _, _, body = await read_request(reader)
        seen.append(body)
        writer.write(ok(body))
        await writer.drain()
        close_now(writer, "fin")

    async def check(pool: Pool) -> None:
        for body in (b"a", b"b", b"c"):
            assert (await pool.request("POST", "/", body, timeout=5))[2] == body

    assert len(serve(handler, check)) == 3
    assert seen == [b"a", b"b", b"c"]


# --- redirects ----------------------------------------------------------------------------------------------

def redirect(status: int, location: str) -> bytes:
    return b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 5\r\n\r\nmoved" % (status, location.encode())


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_are_followed_with_the_same_method_and_body(status: int) -> None:
    seen: list[tuple[str, bytes]] = []

    def respond(line: str, body: bytes) -> bytes:
        seen.append((line, body))
        return redirect(status, "/v2/chat?x=1") if "/v1/" in line else ok(b"here")

    async def check(pool: Pool) -> None:
        assert await pool.request("POST", "/v1/chat", b"{}", timeout=5) == (
            200, {"content-type": "application/json", "content-length": "4"}, b"here")

    assert len(serve(counting(respond), check)) == 1  # the same origin: the same kept-alive connection
    assert seen == [("POST /v1/chat HTTP/1.1", b"{}"), ("POST /v2/chat?x=1 HTTP/1.1", b"{}")]


def test_a_redirect_to_another_origin_uses_its_own_connection_without_the_key() -> None:
    other: list[tuple[str, dict[str, str], bytes]] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            request = await read_request(reader)
            other.append(request)
            writer.write(ok(b"moved here"))
            await writer.drain()

    ports: list[int] = []

    async def main() -> None:
        target, target_port = await listen(elsewhere)
        ports.append(target_port)

        async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
            while True:
                _, headers, _ = await read_request(reader)
                assert headers["authorization"] == "Bearer sk-test"
                writer.write(redirect(308, f"http://localhost:{target_port}/v1/chat/completions"))
                await writer.drain()

        origin, origin_port = await listen(first)
        pool = Pool(f"http://127.0.0.1:{origin_port}/v1", headers={"Authorization": "Bearer sk-test"})
        try:
            for _ in range(2):
                assert (await pool.request("POST", "/chat/completions", b"{}", timeout=5))[2] == b"moved here"
        finally:
            await pool.close()
            origin.close()
            target.close()

    asyncio.run(main())
    assert [(line, headers["host"], body) for line, headers, body in other] == [
        ("POST /v1/chat/completions HTTP/1.1", f"localhost:{ports[0]}", b"{}")] * 2
    assert all("authorization" not in headers for _, headers, _ in other)


def test_redirects_are_bounded_and_the_last_one_is_returned() -> None:
    seen: list[str] = []

    def respond(line: str, body: bytes) -> bytes:
        seen.append(line)
        return redirect(307, "/again")

    async def check(pool: Pool) -> None:
        status, headers, content = await pool.request("POST", "/", b"{}", timeout=5)
        assert (status, headers["location"], content) == (307, "/again", b"moved")

    serve(counting(respond), check)
    assert len(seen) == 1 + MAX_REDIRECTS


def test_301_302_303_are_followed_for_get_only() -> None:
    seen: list[str] = []

    def respond(line: str, body: bytes) -> bytes:
        seen.append(line)
        code = {"/301": 301, "/302": 302, "/303": 303}.get(line.split()[1])
        return redirect(code, "/models") if code else ok(b"models")

    async def check(pool: Pool) -> None:
        for code in (301, 302, 303):
            assert (await pool.request("GET", f"/{code}", timeout=5))[:3:2] == (200, b"models")
            # A POST would have to become a GET and lose its body: the answer is returned as it is.
            assert (await pool.request("POST", f"/{code}", b"{}", timeout=5))[0] == code

    serve(counting(respond), check)
    assert seen == ["GET /301 HTTP/1.1", "GET /models HTTP/1.1", "POST /301 HTTP/1.1",
                    "GET /302 HTTP/1.1", "GET /models HTTP/1.1", "POST /302 HTTP/1.1",
                    "GET /303 HTTP/1.1", "GET /models HTTP/1.1", "POST /303 HTTP/1.1"]


# --- encodings and the size cap ----------------------------------------------------------------------------

PAYLOAD = b'{"choices": [{"message": {"content": "' + b"x" * 5000 + b'"}}]}'


def encoded(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS if coding == "raw deflate" else zlib.MAX_WBITS)
    return raw.compress(data) + raw.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
@pytest.mark.parametrize("chunked", [False, True])
def test_identity_is_asked_and_a_compressed_body_is_decoded_anyway(coding: str, chunked: bool) -> None:
    asked: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            _, headers, _ = await read_request(reader)
            asked.append(headers["accept-encoding"])
            body = encoded(coding, PAYLOAD)
            name = coding.split()[-1].encode()
            if chunked:
                half = len(body) // 2
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (name, half, body[:half], len(body) - half,
                                                                   body[half:]))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    name, len(body), body))
            await writer.drain()

    async def check(pool: Pool) -> None:
        for _ in range(2):
            assert (await pool.request("GET", "/", timeout=5))[2] == PAYLOAD

    assert len(serve(handler, check)) == 1
    assert asked == ["identity", "identity"]


def test_an_encoding_it_cannot_decode_is_a_protocol_error() -> None:
    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="'br'"):
            await pool.request("GET", "/", timeout=5)

    serve(counting(lambda line, body: ok(b"\x8b\x00", "Content-Encoding: br\r\n")), check)


@pytest.mark.parametrize("framing", ["length", "chunked", "gzip"])
def test_a_response_past_the_cap_fails_and_its_connection_is_discarded(framing: str) -> None:
    def respond(line: str, body: bytes) -> bytes:
        if line.split()[1] == "/small":
            return ok(b"x" * 1000)
        if framing == "chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n" * 1 \
                + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n"
        if framing == "gzip":  # 100 kB of zeros in 100-odd bytes: the cap counts what it decodes to
            return ok(gzip.compress(b"0" * 100_000), "Content-Encoding: gzip\r\n")
        return ok(b"x" * 1001)

    async def check(pool: Pool) -> None:
        assert len((await pool.request("GET", "/small", timeout=5))[2]) == 1000  # the cap itself is allowed
        with pytest.raises(ResponseTooLarge, match="larger than 1000 bytes, the cap") as caught:
            await pool.request("GET", "/big", timeout=5)
        assert caught.value.limit == 1000
        assert len((await pool.request("GET", "/small", timeout=5))[2]) == 1000

    connections = serve(counting(respond), check, max_response=1000)
    # A decoded gzip body came whole off the wire, so its connection stays; a body cut off mid-way cannot.
    assert len(connections) == (1 if framing == "gzip" else 2)


def test_the_cap_is_set_per_model_and_its_error_says_how_to_raise_it() -> None:
    entry = OpenAIModel(backend="openai", model="m", max_response_mb=0.5).model_dump()
    assert from_config(entry).max_response_mb == 0.5  # a model entry in YAML takes it

    async def main() -> None:
        server, port = await listen(counting(lambda line, body: ok(b'{"choices": []}' + b" " * 2 ** 20)))
        backend = OpenAIBackend("m", f"http://127.0.0.1:{port}/v1", max_response_mb=1, transport="fast")
        try:
            with pytest.raises(BackendError) as caught:
                await backend.complete(Request(messages=[{"role": "user", "content": "hi"}]))
        finally:
            await backend.aclose()
            server.close()
        assert "larger than 1 MiB; raise `max_response_mb` on the model" in str(caught.value)
        assert not caught.value.retryable

    asyncio.run(main())


# --- proxies ------------------------------------------------------------------------------------------------

class Proxy:
    """A tiny HTTP proxy on 127.0.0.1: absolute-form requests (answers framed by Content-Length) and CONNECT.

    Records (request line, Proxy-Authorization, index of the client's connection to the proxy).
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        self.connections = 0
        self.port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            while True:
                line, headers, body = await read_request(reader)
                self.seen.append((line, headers.get("proxy-authorization"), index))
                method, target, _ = line.split(" ")
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    up_reader, upstream = await asyncio.open_connection(host, int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
                    return
                url = urlsplit(target)  # absolute-form: passed on in origin-form, without the proxy's header
                if upstream is None:
                    up_reader, upstream = await asyncio.open_connection(url.hostname, url.port)
                kept = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if not k.startswith("proxy-"))
                query = f"?{url.query}" if url.query else ""
                upstream.write(f"{method} {url.path}{query} HTTP/1.1\r\n{kept}\r\n".encode("latin-1") + body)
                head = await up_reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                writer.write(head + await up_reader.readexactly(length))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def through_proxy(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str],
                  check: Callable[[Proxy, int], Awaitable[None]], *, ssl_server: ssl.SSLContext | None = None) -> None:
    """Run an echo origin and a Proxy; set `variables` ("{proxy}" becomes the proxy's port); run `check`."""
    async def main() -> None:
        proxy = Proxy()
        proxy_server = await proxy.start()
        origin, port = await listen(counting(lambda line, body: ok(line.encode() + b" " + body)), ssl_server=ssl_server)
        for name, value in variables.items():
            monkeypatch.setenv(name, value.replace("{proxy}", str(proxy.port)))
        try:
            await check(proxy, port)
        finally:
            origin.close()
            proxy_server.close()

    asyncio.run(main())


@pytest.mark.parametrize("variable", ["ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"])
def test_an_http_url_goes_through_the_proxy_in_absolute_form(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    async def check(proxy: Proxy, port: int) -> None:
        pool = Pool(f"http://127.0.0.1:{port}/v1")
        try:
            for body in (b"one", b"two"):
                assert (await pool.request("POST", "/chat", body, timeout=5))[2] == b"POST /v1/chat HTTP/1.1 " + body
        finally:
            await pool.close()
        token = "Basic " + base64.b64encode(b"me:p@ss").decode()
        assert proxy.seen == [(f"POST http://127.0.0.1:{port}/v1/chat HTTP/1.1", token, 0)] * 2  # kept alive

    through_proxy(monkeypatch, {variable: "http://me:p%40ss@127.0.0.1:{proxy}"}, check)


def test_no_proxy_exempts_a_host(monkeypatch: pytest.MonkeyPatch) -> None:
    async def check(proxy: Proxy, port: int) -> None:
        pool = Pool(f"http://127.0.0.1:{port}")
        try:
            assert (await pool.request("POST", "/", b"direct", timeout=5))[2] == b"POST / HTTP/1.1 direct"
        finally:
            await pool.close()
        assert proxy.seen == []

    through_proxy(monkeypatch, {"ALL_PROXY": "http://127.0.0.1:{proxy}", "no_proxy": "localhost,127.0.0.1"}, check)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
@pytest.mark.parametrize("variable", ["ALL_PROXY", "HTTPS_PROXY"])
def test_an_https_url_goes_through_a_connect_tunnel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    variable: str) -> None:
    server_ctx, client_ctx = certificate(tmp_path)

    async def check(proxy: Proxy, port: int) -> None:
        pool = Pool(f"https://localhost:{port}/v1", ssl_context=client_ctx)
        try:
            for body in (b"one", b"two"):
                assert (await pool.request("POST", "/chat", body, timeout=5))[2] == b"POST /v1/chat HTTP/1.1 " + body
        finally:
            await pool.close()
        assert proxy.seen == [(f"CONNECT localhost:{port} HTTP/1.1", None, 0)]  # one tunnel for both

    through_proxy(monkeypatch, {variable: "http://127.0.0.1:{proxy}"}, check, ssl_server=server_ctx)


def test_a_proxy_refusing_connect_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, port = await listen(refuse)
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{port}")
        pool = Pool("https://api.example.com/v1")
        try:
            with pytest.raises(ProtocolError, match=r"refused CONNECT to api\.example\.com:443: .*407") as caught:
                await pool.request("POST", "/chat", b"{}", timeout=5)
            assert "secret" not in str(caught.value)
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())


def test_a_socks_proxy_is_refused_by_name_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://user:secret@127.0.0.1:1080")
    with pytest.raises(ValueError, match=r"socks5://127\.0\.0\.1:1080.*only to http:// proxies") as caught:
        Pool("https://api.example.com/v1")
    assert "secret" not in str(caught.value)
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert Pool("https://api.example.com/v1").proxy is None


def test_garbage_after_a_whole_response_retires_the_connection() -> None:
    per_connection = serve(counting(lambda line, body: ok(b"{}") + b"garbage\r\n"), lambda pool: _times(pool, 2))
    assert len(per_connection) == 2


def test_an_announced_length_past_the_cap_fails_before_the_body_arrives() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nthe first bytes of a gigabyte")
        await writer.drain()
        await reader.read()  # and nothing more: without the check on the header, the client would time out

    async def check(pool: Pool) -> None:
        with pytest.raises(ResponseTooLarge, match="larger than 64 MiB"):
            await pool.request("GET", "/", timeout=5)

    serve(handler, check)


def test_the_openai_backend_by_default_goes_through_all_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async def check(proxy: Proxy, port: int) -> None:
        backend = OpenAIBackend("m", f"http://127.0.0.1:{port}/v1")
        try:
            assert backend.transport == "fast"
            await backend.check()
        finally:
            await backend.aclose()
        assert proxy.seen == [(f"GET http://127.0.0.1:{port}/v1/models HTTP/1.1", None, 0)]

    through_proxy(monkeypatch, {"ALL_PROXY": "http://127.0.0.1:{proxy}"}, check)


def test_a_switch_of_protocols_is_a_protocol_error() -> None:
    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="malformed HTTP response"):
            await pool.request("GET", "/", timeout=5)

    serve(counting(lambda line, body: b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                                      b"Upgrade: websocket\r\n\r\n"), check)


def test_a_body_read_to_the_close_is_not_taken_whole_when_the_close_is_a_reset() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n{\"choices\": [")
        await writer.drain()
        await asyncio.sleep(0.05)  # let the bytes leave before the reset, which would discard them
        close_now(writer, "reset")

    async def check(pool: Pool) -> None:
        with pytest.raises(ProtocolError, match="before the response was complete"):
            await pool.request("GET", "/", timeout=5)

    serve(handler, check)
