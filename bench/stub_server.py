"""A minimal OpenAI-compatible server on 127.0.0.1, for benchmarks and tests.

    python bench/stub_server.py --port 8123 [--fail-rate 0.1 --slow-rate 0.05 --drop-rate 0.01 --seed 1]

    runner, url = await start_stub(fail_rate=0.1)   # in-process, ephemeral port; url ends in /v1
    ...
    await runner.cleanup()

POST /v1/chat/completions answers at once with a short deterministic reply per choice
(a hash and a prefix of the last user message, plus the choice index), honours `n`
and reports usage (whitespace-separated words as tokens). GET /v1/models lists the
served model names; GET /v1/_stats says how many completion and embedding requests
it has answered (benchmarks count HTTP calls with it).

    proc, url = launch("--fail-rate", "0.2")   # in a subprocess of its own; kill proc to stop it

It shares the machine's cores with the client it measures, so it does as little as
possible per request: no access log, no validation, orjson both ways, and no random
draw when no fault is configured.

Faults, drawn independently per request from a seeded RNG:
  fail_rate                 answer 429 (with Retry-After) or 500, half and half
  slow_rate, slow_seconds   wait before answering (slow_jitter j: a uniform draw in
                            slow_seconds * [1 - j, 1 + j], as a real server's varies)
  drop_rate                 close the connection without an answer
A request can also force its own answer through extra_body, so tests need no RNG:
  "stub_status": 400        answer with this status and an OpenAI-style error body
  "stub_retry_after": "2"   the Retry-After header sent with it (seconds or an HTTP date)
A forced 401 quotes the bearer token back, as OpenAI does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(slots=True)
class Faults:
    fail_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 1.0
    slow_jitter: float = 0.0
    drop_rate: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.fail_rate or self.slow_rate or self.drop_rate)


@dataclass(slots=True)
class StubState:
    """What the server saw, for assertions in tests."""

    faults: Faults
    models: tuple[str, ...]
    rng: random.Random
    requests: int = 0
    last_body: dict[str, Any] | None = None
    last_headers: dict[str, str] = field(default_factory=dict)


STATE = web.AppKey("state", StubState)


def reply_text(prompt: str, index: int) -> str:
    """The deterministic reply to `prompt` for choice `index` (tests recompute it)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=4).hexdigest()
    return f"{digest}:{index} {prompt[:24]}"


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def _error(status: int, retry_after: str | None = None, authorization: str = "") -> web.Response:
    kind = {400: "invalid_request_error", 401: "invalid_api_key",
            429: "rate_limit_exceeded"}.get(status, "server_error")
    # Like OpenAI, a 401 quotes the key it was given: clients must keep it out of their own errors.
    message = {400: "This model's maximum context length is 2048 tokens (stub)",
               401: f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}",
               429: "Rate limit reached (stub)"}.get(status, f"stub error {status}")
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return _json({"error": {"message": message, "type": kind, "code": kind}}, status, headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = orjson.loads(await request.read())
    state.requests += 1
    state.last_body = body
    state.last_headers = dict(request.headers)

    if "stub_status" in body:
        return _error(int(body["stub_status"]), body.get("stub_retry_after"),
                      request.headers.get("Authorization", ""))
    faults = state.faults
    if faults.active:
        rng = state.rng
        if faults.drop_rate and rng.random() < faults.drop_rate:
            # Abort rather than close: the client sees a reset with no response at all.
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if faults.fail_rate and rng.random() < faults.fail_rate:
            return _error(429, "1") if rng.random() < 0.5 else _error(500)
        if faults.slow_rate and rng.random() < faults.slow_rate:
            jitter = faults.slow_jitter
            await asyncio.sleep(faults.slow_seconds * (1 + jitter * (2 * rng.random() - 1) if jitter else 1))

    messages = body.get("messages") or []
    prompt = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    texts = [reply_text(prompt, i) for i in range(int(body.get("n") or 1))]
    prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
    completion_tokens = sum(len(t.split()) for t in texts)
    return _json({
        "id": f"stub-{state.requests}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                     "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


async def embeddings(request: web.Request) -> web.Response:
    """Deterministic 16-dimensional vectors from a hash of each input, normalised."""
    state = request.app[STATE]
    body = orjson.loads(await request.read())
    state.requests += 1
    state.last_body = body
    inputs = body.get("input") or []
    inputs = [inputs] if isinstance(inputs, str) else inputs
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.blake2b(str(text).encode(), digest_size=16).digest()
        vector = [b - 127.5 for b in digest]
        norm = sum(x * x for x in vector) ** 0.5 or 1.0
        data.append({"object": "embedding", "index": i, "embedding": [x / norm for x in vector]})
    tokens = sum(len(str(t).split()) for t in inputs)
    return _json({"object": "list", "data": data, "model": body.get("model", ""),
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def list_models(request: web.Request) -> web.Response:
    models = request.app[STATE].models
    return _json({"object": "list",
                  "data": [{"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in models]})


async def stats(request: web.Request) -> web.Response:
    return _json({"requests": request.app[STATE].requests})


def make_app(faults: Faults, models: tuple[str, ...] = ("stub",)) -> web.Application:
    app = web.Application()
    app[STATE] = StubState(faults=faults, models=models, rng=random.Random(faults.seed))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/_stats", stats)
    return app


async def start_stub(port: int = 0, *, models: tuple[str, ...] = ("stub",), fail_rate: float = 0.0,
                     slow_rate: float = 0.0, slow_seconds: float = 1.0, slow_jitter: float = 0.0,
                     drop_rate: float = 0.0,
                     seed: int = 0) -> tuple[web.AppRunner, str]:
    """Serve on 127.0.0.1:`port` (0 = any free port); return the runner and the base URL (…/v1).

    The caller owns the runner: `await runner.cleanup()` stops the server. `runner.app[STATE]`
    holds what the server saw.
    """
    faults = Faults(fail_rate=fail_rate, slow_rate=slow_rate, slow_seconds=slow_seconds, slow_jitter=slow_jitter,
                    drop_rate=drop_rate, seed=seed)
    runner = web.AppRunner(make_app(faults, models), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    # Bind the socket ourselves so an ephemeral port is known without reaching into the site.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def launch(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """Run this file with `flags` on a free port in a subprocess; return it and its base URL.

    A subprocess, so that the stub has a core of its own and the client's CPU time is its own.
    """
    proc = subprocess.Popen([sys.executable, __file__, "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()  # the stub's first line
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit(f"the stub server did not start (exit code {proc.wait()})")
    return proc, url


async def _serve(args: argparse.Namespace) -> None:
    _, url = await start_stub(args.port, fail_rate=args.fail_rate, slow_rate=args.slow_rate,
                              slow_seconds=args.slow_seconds, slow_jitter=args.slow_jitter,
                              drop_rate=args.drop_rate, seed=args.seed)
    # The first stdout line is the URL: bench_throughput.py waits for it before measuring.
    print(url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8123, help="0 picks a free port")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--slow-rate", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=1.0)
    parser.add_argument("--slow-jitter", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
