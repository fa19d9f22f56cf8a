"""retort.backends.wire: the HTTP/1.1 client, against raw servers that send exact bytes."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from retort.backends.wire import Pool, ProtocolError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def serve(handler: Handler, check: Callable[[Pool], Awaitable[None]], *,
          ssl_server: ssl.SSLContext | None = None, ssl_client: ssl.SSLContext | None = None,
          limit: int = 8) -> list[int]:
    """Run `handler` as a server on 127.0.0.1 (given each connection's index) and `check` against it.

    Returns the number of requests each connection carried.
    """
    per_connection: list[int] = []

    async def main() -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            index = len(per_connection)
            per_connection.append(0)
            try:
                await handler(reader, writer, index)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_server)
        port = server.sockets[0].getsockname()[1]
        scheme = "https" if ssl_server else "http"
        host = "localhost" if ssl_server else "127.0.0.1"
        pool = Pool(f"{scheme}://{host}:{port}", headers={"Content-Type": "application/json"}, limit=limit,
                    ssl_context=ssl_client)
        try:
            await check(pool)
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())
    return per_connection


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


def test_a_connection_dropped_without_an_answer_fails_and_is_not_retried() -> None:
    # The server answers once, then drops the connection the client reuses. The client does not
    # send the request again on its own: the runner's retries own that decision (and count it).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(ok(b"%d" % index))
        await writer.drain()
        await read_request(reader)
        writer.transport.abort()

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"a", timeout=5))[2] == b"0"
        with pytest.raises(ProtocolError, match="closed the connection"):
            await pool.request("POST", "/", b"b", timeout=5)
        assert (await pool.request("POST", "/", b"c", timeout=5))[2] == b"1"  # a new connection

    assert len(serve(handler, check)) == 2


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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_verified_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def check(pool: Pool) -> None:
        assert (await pool.request("POST", "/", b"secret", timeout=5))[2] == b"secret"

    serve(counting(lambda line, body: ok(body)), check, ssl_server=server_ctx,
          ssl_client=ssl.create_default_context(cafile=str(cert)))

    async def untrusted(pool: Pool) -> None:  # the system CAs do not trust a self-signed certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            await pool.request("POST", "/", b"secret", timeout=5)

    serve(counting(lambda line, body: ok(body)), untrusted, ssl_server=server_ctx)


def test_bytes_past_the_announced_length_retire_the_connection() -> None:
    per_connection = serve(counting(lambda line, body: ok(b"{}") + b"HTTP/1.1 200 OK\r\n"),
                           lambda pool: _times(pool, 2))
    assert len(per_connection) == 2  # the second request could not trust the first connection's framing
