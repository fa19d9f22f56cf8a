"""In-process vLLM (`vllm.LLM`): a stage's requests generated in batches on local GPUs.

    pip install "retort[vllm]"

    models:
      default: {backend: vllm, model: Qwen/Qwen2.5-7B-Instruct, engine_args: {max_model_len: 8192}}

    retort run sse_cot --model default=vllm:Qwen/Qwen2.5-0.5B-Instruct

Written against vLLM 0.33.0, the newest release on PyPI when it was written. The
API was read from that release's own source (`vllm/entrypoints/llm.py`,
`vllm/sampling_params.py`, `vllm/outputs.py` in its wheel). It needs vLLM 0.10.2
or later, the first release with `StructuredOutputsParams`. vLLM 0.12.0 removed
`GuidedDecodingParams` and the `guided_decoding=` argument, so this module never
uses them. The tests run against a stand-in module (tests/vllm_standin), not
against vLLM; scripts/vllm_smoke.py checks a real vLLM on a GPU machine.

Batching. The runner gives every backend `max_concurrency` workers, each awaiting
one `complete(request)`. Here `complete` only queues the request with a future.
One batcher task takes what is queued: up to `chunk_size` requests, or whatever
arrived within WINDOW of the first. It runs ONE
`llm.chat(conversations, [SamplingParams, ...], use_tqdm=False)` for them in a
dedicated worker thread, because the engine is not thread-safe and the event loop
must stay free. vLLM schedules the chunk with continuous batching, and each future
gets its Completion when the call returns.

Why chunks and not one call per stage: a chunk's completions reach the runner as
soon as that chunk returns. The cache group-commits them (at least once a second)
while the next chunk generates. So a process killed mid-stage loses at most the
chunk in flight, about `chunk_size` requests, plus the last flush interval, and a
rerun resumes from the cache. Larger chunks keep the GPU busier; smaller ones
lose less in a crash. `max_concurrency` defaults to two chunks, so the next chunk
is already queued when one finishes.

How a Request becomes vLLM arguments:
- `params` (temperature, top_p, max_tokens, seed, stop) are SamplingParams fields,
  and `extra_body` keys are passed through as SamplingParams fields too (top_k,
  repetition_penalty, ...). A dict under `structured_outputs` becomes
  StructuredOutputsParams. A key SamplingParams does not take fails that request
  (vLLM refuses unknown names).
- An unset `max_tokens` is None, meaning up to the context length, as `vllm serve`
  does (SamplingParams' own default is 16 tokens). The model's generation-config
  defaults (temperature, top_p, ...) apply, as in `vllm serve`; to turn them off,
  set `engine_args: {generation_config: vllm}`.
- `n` becomes `n`. vLLM refuses n > 1 at temperature 0, so there the backend
  generates one greedy sample and copies it n times. The copies are counted as n
  samples.
- `schema` becomes `structured_outputs=StructuredOutputsParams(json=schema)`. A
  choice stage's options, when the request carries them (`request.choices`),
  become `StructuredOutputsParams(choice=[...])`.
- A prefill (the last message's role is assistant) is sent with
  `continue_final_message=True, add_generation_prompt=False`, and the text is the
  continuation only. `chat` takes these flags once per call, so a chunk that
  mixes both kinds makes two calls.

Errors. vLLM checks each prompt as it adds it to the engine, and aborts the whole
call when one fails (a prompt longer than the context, for example). So a failed
chunk is split in halves until the failing requests are isolated: one bad row
fails alone, as a BackendError that is not retryable. A dead engine
(EngineDeadError) fails the whole chunk and is not retryable. Transient failures
are retryable: vLLM's RetryableRequestError, and an output whose finish reason is
"error".

Loading. `check()` loads the model, so a missing vLLM (UserError, with the install
hint) or a bad model id (BackendError) fails before the run starts. vLLM's logs go
to stderr (VLLM_LOGGING_STREAM, unless already set), because stdout carries
`retort run --json`. `aclose()` drops the engine and shuts the worker thread down.

Identity. `vllm:<model>`, with `+<hash>` added when `engine_args` holds arguments
that change completions (revision, dtype, quantization, chat template,
generation config, max_model_len, seed, ...). Arguments that only change speed
(gpu_memory_utilization, tensor_parallel_size, ...) keep the cache.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from retort.backends.base import Completion, Request, backend_options, reason_text
from retort.errors import BackendError, RetortError, SpecError, UserError

if TYPE_CHECKING:
    from vllm import LLM

T = TypeVar("T")

TARGET_VERSION = "0.33.0"  # the vLLM release this module was written and checked against
MIN_VERSION = "0.10.2"  # the first release with StructuredOutputsParams
INSTALL_HINT = 'the vllm backend needs vLLM (Linux, a CUDA GPU): pip install "retort[vllm]"'
CHUNK_SIZE = 256  # requests per llm.chat call
WINDOW = 0.02  # seconds the batcher waits for more requests after the first of a chunk
GREEDY = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature samples greedily, and n > 1 is refused

_CONFIG_KEYS = frozenset({"model", "engine_args", "identity", "max_concurrency", "chunk_size"})
# What `vllm serve` takes from the model's generation config by default (ModelConfig.get_diff_sampling_param).
_MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")
# Engine arguments that change what the model writes, so they enter the identity (and the cache key).
_IDENTITY_ARGS = frozenset({"revision", "tokenizer", "tokenizer_revision", "tokenizer_mode", "dtype", "quantization",
                            "chat_template", "generation_config", "override_generation_config", "hf_overrides",
                            "max_model_len", "seed", "kv_cache_dtype"})


def _identity_for(model: str, engine_args: dict[str, Any]) -> str:
    relevant = {k: v for k, v in engine_args.items() if k in _IDENTITY_ARGS}
    if not relevant:
        return f"vllm:{model}"
    digest = hashlib.sha256(orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()[:8]
    return f"vllm:{model}+{digest}"


def _named(exc: BaseException, name: str) -> bool:
    """Match vLLM's exceptions by class name, so this module imports nothing of vLLM's at load time."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _is_prefill(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and messages[-1].get("role") == "assistant"


@dataclass(slots=True)
class _Pending:
    request: Request
    future: asyncio.Future[Completion]


@dataclass(slots=True)
class _Prompt:
    """One request of a chunk, ready for llm.chat."""

    index: int  # position in the chunk
    messages: list[dict[str, str]]
    params: Any  # vllm.SamplingParams
    n: int  # sequences vLLM generates
    copies: int  # each is repeated this many times (greedy n > 1)


class VLLMBackend:
    constrains_choices = True  # the runner passes a choice stage's options (and keys calls on them)

    def __init__(self, model: str, *, engine_args: dict[str, Any] | None = None, identity: str | None = None,
                 max_concurrency: int | None = None, chunk_size: int | None = None,
                 window: float | None = None) -> None:
        if not model:
            raise ValueError("VLLMBackend needs a model: a Hugging Face id or a local path")
        self.model = model
        self.engine_args = dict(engine_args or {})
        if "model" in self.engine_args:
            raise ValueError("give the model as `model`, not in engine_args")
        if chunk_size is None:
            chunk_size = min(CHUNK_SIZE, max_concurrency) if max_concurrency else CHUNK_SIZE
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency or 2 * chunk_size
        self.window = WINDOW if window is None else window
        self.identity = identity or _identity_for(model, self.engine_args)
        self._llm: LLM | None = None
        self._sampling_params: Callable[..., Any] | None = None  # vllm.SamplingParams, once loaded
        self._structured_outputs: Callable[..., Any] | None = None  # vllm.sampling_params.StructuredOutputsParams
        self._defaults: dict[str, Any] = {}  # the model's generation-config sampling defaults
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._chunk: list[_Pending] = []  # the chunk being generated

    def __repr__(self) -> str:
        return f"VLLMBackend(identity={self.identity!r}, chunk_size={self.chunk_size})"

    # --- the contract -------------------------------------------------------------------

    async def complete(self, request: Request) -> Completion:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()
        self._queue_for(loop).put_nowait(_Pending(request, future))
        return await future

    async def check(self) -> None:
        """Load the model now, so a missing vLLM or a bad model id fails before the run starts."""
        await self._in_worker(self._load)

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            if self._batcher.get_loop() is asyncio.get_running_loop():  # another loop's task ended with it
                await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
        waiting = list(self._chunk)
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(self._error("the backend was closed before this request ran"))
        self._chunk, self._queue, self._loop = [], None, None
        if self._executor is not None:
            await self._in_worker(self._unload)  # after any chunk still generating in the thread
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- the batcher (event loop) -------------------------------------------------------

    def _queue_for(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[_Pending]:
        if self._queue is None or self._loop is not loop or self._batcher is None or self._batcher.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._batcher = loop.create_task(self._batch_loop(self._queue))
        return self._queue

    async def _batch_loop(self, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            chunk = [await queue.get()]
            if queue.qsize() + 1 < self.chunk_size and self.window > 0:
                await asyncio.sleep(self.window)  # the rest of a wave of requests arrives within a few ms
            while len(chunk) < self.chunk_size and not queue.empty():
                chunk.append(queue.get_nowait())
            self._chunk = [p for p in chunk if not p.future.done()]  # a caller may have been cancelled
            if self._chunk:
                await self._run_chunk(self._chunk)
            self._chunk = []

    async def _run_chunk(self, chunk: list[_Pending]) -> None:
        try:
            results = await self._in_worker(self._generate, [p.request for p in chunk])
        except RetortError as exc:  # the model did not load: every request fails, none hangs
            results = [self._error(str(exc).removeprefix(f"model {self.identity!r}: ")) for _ in chunk]
        except Exception as exc:
            results = [self._error(f"{type(exc).__name__}: {exc}") for _ in chunk]
        for pending, result in zip(chunk, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    # --- in the worker thread -----------------------------------------------------------

    def _load(self) -> LLM:
        if self._llm is None:
            # vLLM logs to stdout by default, where `retort run --json` writes its result. Send the logs
            # to stderr, unless the user chose a stream (the engine processes inherit this too).
            os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
            try:
                import vllm
                from vllm.sampling_params import SamplingParams, StructuredOutputsParams
            except ImportError as exc:
                if exc.name == "vllm":
                    raise UserError(INSTALL_HINT) from None
                if "StructuredOutputsParams" in str(exc):
                    raise UserError(f"vLLM {getattr(vllm, '__version__', '?')} is too old: the vllm backend needs "
                                    f"vllm>={MIN_VERSION} (it targets {TARGET_VERSION})") from None
                raise UserError(f"vLLM is installed but does not import ({exc}); {INSTALL_HINT}") from None
            try:
                llm = vllm.LLM(model=self.model, **self.engine_args)
            except Exception as exc:  # an unknown model id, no GPU, out of memory, a bad engine argument
                raise self._error(f"could not load the model: {type(exc).__name__}: {exc}") from exc
            self._sampling_params, self._structured_outputs = SamplingParams, StructuredOutputsParams
            self._defaults = self._model_defaults(llm, SamplingParams)
            self._llm = llm
        return self._llm

    @staticmethod
    def _model_defaults(llm: Any, sampling_params: Callable[..., Any]) -> dict[str, Any]:
        """The sampling defaults of the model's generation config, which `vllm serve` applies too."""
        try:
            model, neutral = llm.get_default_sampling_params(), sampling_params()
        except Exception:  # not worth failing the load over: vLLM's neutral defaults apply
            return {}
        return {k: getattr(model, k) for k in _MODEL_DEFAULTS
                if hasattr(model, k) and getattr(model, k) != getattr(neutral, k, None)}

    def _unload(self) -> None:
        self._llm = None
        gc.collect()  # vLLM frees GPU memory when the engine is collected

    def _generate(self, requests: list[Request]) -> list[Completion | BackendError]:
        llm = self._load()
        results: list[Completion | BackendError | None] = [None] * len(requests)
        groups: dict[bool, list[_Prompt]] = {False: [], True: []}
        for i, request in enumerate(requests):
            try:
                groups[_is_prefill(request.messages)].append(self._prompt(i, request))
            except BackendError as exc:
                results[i] = exc
        for prefill, prompts in groups.items():
            if prompts:
                self._chat(llm, prompts, prefill, results)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _chat(self, llm: Any, prompts: list[_Prompt], prefill: bool,
              results: list[Completion | BackendError | None]) -> None:
        try:
            outputs = llm.chat([p.messages for p in prompts], [p.params for p in prompts], use_tqdm=False,
                               add_generation_prompt=not prefill, continue_final_message=prefill)
        except Exception as exc:
            if len(prompts) > 1 and not _named(exc, "EngineDeadError"):
                half = len(prompts) // 2  # isolate the request(s) that failed the call
                self._chat(llm, prompts[:half], prefill, results)
                self._chat(llm, prompts[half:], prefill, results)
                return
            for p in prompts:
                results[p.index] = self._engine_error(exc)
            return
        if len(outputs) != len(prompts):
            for p in prompts:
                results[p.index] = self._error(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
            return
        for p, output in zip(prompts, outputs, strict=True):
            results[p.index] = self._completion(p, output)

    # --- request and response -----------------------------------------------------------

    def _prompt(self, index: int, request: Request) -> _Prompt:
        """The SamplingParams of one request. Later sources win: model defaults, params, extra_body."""
        assert self._sampling_params is not None and self._structured_outputs is not None
        params = {k: v for k, v in request.params.items() if v is not None}
        extra = dict(params.pop("extra_body", None) or {})
        kwargs: dict[str, Any] = {**self._defaults, **params}
        kwargs.setdefault("max_tokens", None)  # up to the context length, not SamplingParams' 16
        structured: dict[str, Any] | None = None
        choices = getattr(request, "choices", None)
        if request.schema is not None:
            structured = {"json": request.schema}
        elif choices:
            structured = {"choice": list(choices)}
        if "structured_outputs" in extra:
            structured = extra.pop("structured_outputs")
        kwargs.update(extra)
        n, copies = request.n, 1
        temperature = kwargs.get("temperature")
        if n > 1 and temperature is not None and temperature < GREEDY:
            n, copies = 1, n  # greedy samples are identical, and vLLM refuses n > 1 at temperature 0
        kwargs["n"] = n
        try:
            if structured is not None:
                kwargs["structured_outputs"] = (self._structured_outputs(**structured)
                                                if isinstance(structured, dict) else structured)
            params_obj = self._sampling_params(**kwargs)
        except TypeError as exc:  # a name SamplingParams does not take
            guided = sorted(k for k in kwargs if k.startswith("guided_"))
            hint = (f" (vLLM 0.12 removed {', '.join(guided)}: use extra_body: {{structured_outputs: {{...}}}})"
                    if guided else "")
            raise self._error(f"SamplingParams does not take these parameters: {exc}{hint}") from None
        except Exception as exc:  # VLLMValidationError: a value out of range
            raise self._error(f"invalid sampling parameters: {exc}") from None
        return _Prompt(index, request.messages, params_obj, n, copies)

    def _completion(self, prompt: _Prompt, output: Any) -> Completion | BackendError:
        samples = sorted(output.outputs, key=lambda o: o.index)[:prompt.n]
        if len(samples) < prompt.n:
            return self._error(f"vLLM returned {len(samples)} of {prompt.n} samples")
        reasons = [reason_text(s.finish_reason) for s in samples]  # str or None, as every backend's
        if "error" in reasons:  # vLLM: "a retryable request-level internal error"
            return self._error("vLLM finished the request with an internal error", retryable=True)
        copies = prompt.copies
        return Completion(
            texts=[s.text or "" for s in samples for _ in range(copies)],
            prompt_tokens=len(output.prompt_token_ids or ()),  # the prompt is shared by the n samples: once
            completion_tokens=sum(len(s.token_ids) for s in samples) * copies,
            finish_reasons=[r for r in reasons for _ in range(copies)])

    # --- helpers ------------------------------------------------------------------------

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retort-vllm")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _error(self, message: str, *, retryable: bool = False) -> BackendError:
        return BackendError(message, model=self.identity, retryable=retryable)

    def _engine_error(self, exc: Exception) -> BackendError:
        if _named(exc, "EngineDeadError"):
            return self._error(f"the vLLM engine died: {exc}")
        return self._error(f"{type(exc).__name__}: {exc}", retryable=_named(exc, "RetryableRequestError"))


def from_config(config: dict[str, Any]) -> VLLMBackend:
    """Build from a YAML model entry (keys: model, engine_args, identity, max_concurrency, chunk_size)."""
    given = backend_options(config, "vllm", _CONFIG_KEYS)
    if not given.get("model"):
        raise SpecError("backend 'vllm' needs `model`, a Hugging Face model id or a local path", field="model")
    engine_args = given.get("engine_args", {})
    if not isinstance(engine_args, dict):
        raise SpecError("engine_args must be a mapping of vllm.LLM keyword arguments", field="engine_args")
    if "model" in engine_args:
        raise SpecError("give the model as `model`, not in engine_args", field="engine_args.model")
    for key in ("max_concurrency", "chunk_size"):
        value = given.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SpecError(f"{key} must be a positive integer, not {value!r}", field=key)
    return VLLMBackend(**given)
