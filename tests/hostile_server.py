"""A misbehaving OpenAI-compatible server on 127.0.0.1: one mode per way a reply can go wrong.

    with Hostile("parts") as server:   # its own event loop on a thread; gone after `lifetime` seconds anyway
        server.url                      # http://127.0.0.1:PORT/v1
        server.requests                 # chat and embeddings requests answered so far
        server.mode = "good"            # switch between two runs
        server.every = 7                # the mode's reply on every 7th request only, good replies otherwise

A good reply to a chat request echoes its last message: `reply_text(prompt)`. The modes
(`BAD` are those "mixed" cycles through, one bad reply in every `every`):

    parts        content as a list of text parts that join to the good reply (valid OpenAI format)
    number       content is a JSON number: len(prompt) + 0.5
    null         content null, finish_reason "content_filter"
    finish       finish_reason is an object, not a string
    huge_tokens  usage counts above 2^31
    not_chat     200 with an error object, not a completion
    choices      two choices for a request of n=1
    truncated    the good reply's JSON cut in half (Content-Length matches the cut body)
    body_10mb    200 with a 10 MB HTML page
    html_502     502 with nginx's HTML page
    retry_day    429 with `Retry-After: 86400`

Embeddings requests get the same treatment where the shape applies (`embeddings_reply`).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from typing import Any

import orjson
from aiohttp import web

MODEL = "hostile"
BAD = ("parts", "number", "null", "finish", "not_chat", "choices", "truncated", "html_502", "retry_day")
MODES = ("good", "mixed", "huge_tokens", "body_10mb", *BAD)
NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")
DAY_LIMIT = b'{"error": {"message": "Rate limit reached for requests per day (RPD): Limit 10000", "type": "requests"}}'
_BIG_PAGE: list[bytes] = []


def reply_text(prompt: str) -> str:
    return f"echo: {prompt}"


def _big_page() -> bytes:
    if not _BIG_PAGE:
        row = b"<tr><td>upstream</td><td>buffer</td></tr>\n"
        _BIG_PAGE.append(b"<html><head><title>Proxy response buffer overflow</title></head><body><table>\n"
                         + row * (10 * 1024 * 1024 // len(row)) + b"</table></body></html>\n")
    return _BIG_PAGE[0]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


def chat_reply(mode: str, body: dict[str, Any]) -> web.Response:
    """The answer to a chat request in `mode`."""
    prompt = str(body["messages"][-1]["content"])
    text = reply_text(prompt)
    n = int(body.get("n") or 1)
    content: Any = text
    reason: Any = "stop"
    usage: dict[str, Any] = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
    if mode == "parts":
        half = len(text) // 2
        content = [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]
    elif mode == "number":
        content = len(prompt) + 0.5
    elif mode == "null":
        content, reason = None, "content_filter"
    elif mode == "finish":
        reason = {"type": "stop", "stop": None}
    elif mode == "huge_tokens":
        usage = {"prompt_tokens": 2 ** 33, "completion_tokens": 2 ** 40 + 1}
    elif mode == "not_chat":
        return _json({"object": "error", "message": "The model is overloaded, try again later", "code": 503})
    elif mode == "choices":
        n += 1
    elif mode == "body_10mb":
        return web.Response(body=_big_page(), content_type="text/html")
    elif mode == "html_502":
        return web.Response(body=NGINX_502, status=502, content_type="text/html")
    elif mode == "retry_day":
        return web.Response(body=DAY_LIMIT, status=429, headers={"Retry-After": "86400"},
                            content_type="application/json")
    choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
               for i in range(n)]
    data = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL, "choices": choices,
                         "usage": usage})
    if mode == "truncated":
        data = data[:len(data) // 2]
    return web.Response(body=data, content_type="application/json")


def embeddings_reply(mode: str, body: dict[str, Any]) -> web.Response:
    """The answer to an embeddings request in `mode`: the chat modes' failures, and wrong vectors."""
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    rows: list[dict[str, Any]] = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5]}
                                  for i, t in enumerate(texts)]
    usage = {"prompt_tokens": sum(len(str(t).split()) for t in texts)}
    if mode in ("not_chat", "body_10mb", "html_502", "retry_day"):
        return chat_reply(mode, {"messages": [{"content": ""}]})
    if mode == "number":  # vectors as strings of numbers
        rows = [{**row, "embedding": [str(x) for x in row["embedding"]]} for row in rows]
    elif mode == "choices":  # one vector fewer than inputs
        rows = rows[:-1]
    elif mode == "huge_tokens":
        usage = {"prompt_tokens": 2 ** 33}
    elif mode == "parts":  # listed in reverse order: the index says where each belongs
        rows = rows[::-1]
    data = orjson.dumps({"object": "list", "data": rows, "model": MODEL, "usage": usage})
    if mode == "truncated":
        data = data[:len(data) // 2]
    return web.Response(body=data, content_type="application/json")


class Hostile:
    """The server, on a thread with its own event loop. It stops after `lifetime` seconds even if nobody
    stops it, so a failed test cannot leave it running."""

    def __init__(self, mode: str = "good", every: int = 1, lifetime: float = 600) -> None:
        assert mode in MODES, mode
        self.mode, self.every, self.lifetime = mode, every, lifetime
        self.requests = 0
        self.url = ""
        self._turns = itertools.count()
        self._bad = itertools.cycle(BAD)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="hostile-server", daemon=True)
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    def __enter__(self) -> Hostile:
        self._thread.start()
        if not self._started.wait(30) or not self.url:
            raise RuntimeError("the hostile server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, mode: str, every: int = 1) -> None:
        assert mode in MODES, mode
        self.mode, self.every, self.requests = mode, every, 0
        self._turns = itertools.count()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    # --- the server thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        finally:
            self._started.set()
        self._loop.call_later(self.lifetime, self._loop.stop)
        try:
            self._loop.run_forever()
        finally:
            if self._runner is not None:
                self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    def _mode_now(self) -> str:
        """This request's mode: the configured one on every `every`-th request, else a good reply."""
        self.requests += 1
        if next(self._turns) % self.every != self.every - 1:
            return "good"
        return next(self._bad) if self.mode == "mixed" else self.mode

    async def _chat(self, request: web.Request) -> web.Response:
        return chat_reply(self._mode_now(), orjson.loads(await request.read()))

    async def _embeddings(self, request: web.Request) -> web.Response:
        return embeddings_reply(self._mode_now(), orjson.loads(await request.read()))

    async def _models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
