"""A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4, NUL-framed JSON),
shared by the browser tests (the HTML report, the results viewer). Chromium is Debian's package."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHROMIUM = next((found for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
                 if name and (found := shutil.which(name))), None)
TIMEOUT = 60
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--mute-audio"]


class DevTools:
    """Chromium driven over its DevTools pipe: `send` a command, `evaluate` JavaScript, and the events seen
    (`events`), from which `problems` lists what a page must never do."""

    def __init__(self, profile: Path, flags: Sequence[str] = (), *, local: tuple[str, ...] = ()) -> None:
        self.local = ("about:", "data:", *local)  # where the page may send requests
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # high descriptors, so that moving them to 3 and 4 in the child cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        trampoline = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                      "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, *map(str, high), str(CHROMIUM), *FLAGS,
                                      *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], pass_fds=high, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        reply = self._read(lambda m: m.get("id") == self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})  # type: ignore[no-any-return]

    def wait_event(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        return self._read(lambda m: m.get("method") == method)

    def _read(self, match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Everything that should never happen on a page: console errors and warnings, uncaught exceptions,
        error log entries (CSP violations land here), and requests to anything but `local`."""
        out = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(f"uncaught: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                out.append(f"log {params['entry']['source']}: {params['entry']['text']}")
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(self.local):
                out.append(f"request: {params['request']['url']}")
        return out

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", browser=True)
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._w)
            os.close(self._r)
