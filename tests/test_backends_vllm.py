"""VLLMBackend against a stand-in for vllm (tests/vllm_standin), never a real vLLM.

vLLM cannot be installed on these machines (no GPU). The stand-in has the
signatures of vLLM 0.33.0 (`LLM`, `LLM.chat`, `SamplingParams`,
`StructuredOutputsParams`, `RequestOutput`) and records every call, so these tests
check what the backend asks of vLLM: one `chat` per chunk, the SamplingParams, the
prefill flags, token accounting, and error isolation. They also run a pipeline
through the CLI and runner. Whether a real vLLM behaves as documented is checked
on a GPU machine by scripts/vllm_smoke.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import pytest

from retort import backends
from retort.backends import vllm as vllm_backend
from retort.backends.base import Backend, Completion, Request
from retort.backends.vllm import VLLMBackend, from_config
from retort.cli import main
from retort.errors import BackendError, SpecError, UserError
from tests.conftest import use

STANDIN = Path(__file__).resolve().parent / "vllm_standin"
MODEL = "some-org/some-model"
SCHEMA = {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 40}}, "required": ["reason"]}


def _forget_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`import vllm` finds the stand-in for this test only."""
    _forget_vllm()
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)  # the backend sets it: restored afterwards
    import vllm

    assert vllm.__doc__ is not None and "not vLLM" in vllm.__doc__
    yield vllm
    _forget_vllm()




def complete_all(backend: VLLMBackend, requests: list[Request]) -> list[Completion | BaseException]:
    """The requests arrive together, as the runner's workers send a stage's rows."""
    async def go(b: VLLMBackend) -> list[Completion | BaseException]:
        return await asyncio.gather(*(b.complete(r) for r in requests), return_exceptions=True)
    return use(backend, go)


def user(text: str, **kwargs: Any) -> Request:
    return Request(messages=[{"role": "user", "content": text}], **kwargs)


def chat_calls(standin: ModuleType) -> list[Any]:
    (llm,) = standin.LLM.instances
    return list(llm.calls)


# --- batching -----------------------------------------------------------------------------


def test_requests_arriving_together_are_one_chat_call(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL)
    results = complete_all(backend, [user(f"text {i}") for i in range(5)])
    (call,) = chat_calls(standin)
    assert [c[0]["content"] for c in call.messages] == [f"text {i}" for i in range(5)]
    assert len(call.sampling_params) == 5
    assert call.use_tqdm is False
    assert call.thread.startswith("retort-vllm")  # the engine runs in the backend's own worker thread
    # each future gets its own request's completion, in the order of the requests
    assert [r.texts for r in results] == [[f"stand-in reply 0 to: text {i}"] for i in range(5)]  # type: ignore[union-attr]


def test_a_stage_is_generated_in_chunks_of_chunk_size(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL, chunk_size=4)
    assert backend.max_concurrency == 8  # two chunks: the next one waits while one generates
    results = complete_all(backend, [user(f"text {i}") for i in range(10)])
    assert [len(c.messages) for c in chat_calls(standin)] == [4, 4, 2]
    assert all(isinstance(r, Completion) for r in results)
    assert len({c.thread for c in chat_calls(standin)}) == 1  # one worker thread, never two at once


def test_requests_within_the_window_join_one_chunk(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL, window=0.2)

    async def staggered(b: VLLMBackend) -> list[Completion]:
        async def later(i: int) -> Completion:
            await asyncio.sleep(0.02 * i)
            return await b.complete(user(f"text {i}"))
        return list(await asyncio.gather(*(later(i) for i in range(4))))

    use(backend, staggered)
    assert [len(c.messages) for c in chat_calls(standin)] == [4]


def test_the_runner_contract_and_defaults(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL)
    assert isinstance(backend, Backend)
    assert (backend.identity, backend.chunk_size, backend.max_concurrency) == (f"vllm:{MODEL}", 256, 512)
    assert VLLMBackend(MODEL, max_concurrency=8).chunk_size == 8  # never more than the runner can send


# --- sampling parameters ------------------------------------------------------------------


def test_params_become_sampling_params(standin: ModuleType) -> None:
    request = user("hi", n=3, params={"temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "seed": 7,
                                      "stop": ["\n\n"], "extra_body": {"top_k": 20, "repetition_penalty": 1.1}})
    (completion,) = complete_all(VLLMBackend(MODEL), [request])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert isinstance(sp, standin.SamplingParams)
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.seed, sp.stop) == (3, 0.7, 0.9, 32, 7, ["\n\n"])
    assert (sp.top_k, sp.repetition_penalty, sp.structured_outputs) == (20, 1.1, None)
    assert isinstance(completion, Completion) and len(completion.texts) == 3


def test_unset_max_tokens_means_the_whole_context_not_16(standin: ModuleType) -> None:
    complete_all(VLLMBackend(MODEL), [user("hi")])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert sp.max_tokens is None and standin.SamplingParams().max_tokens == 16
    assert (sp.n, sp.temperature, sp.seed) == (1, 1.0, None)


def test_the_model_generation_config_defaults_apply_unless_params_set_them(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL, engine_args={"override_generation_config": {"temperature": 0.6, "top_p": 0.8}})
    complete_all(backend, [user("a"), user("b", params={"temperature": 0.2})])
    first, second = chat_calls(standin)[0].sampling_params
    assert (first.temperature, first.top_p) == (0.6, 0.8)
    assert (second.temperature, second.top_p) == (0.2, 0.8)


def test_a_schema_becomes_structured_outputs_json(standin: ModuleType) -> None:
    (completion,) = complete_all(VLLMBackend(MODEL), [user("why?", n=2, schema=SCHEMA, params={"temperature": 0.5})])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert isinstance(sp.structured_outputs, standin.StructuredOutputsParams)
    assert sp.structured_outputs.json == SCHEMA
    assert isinstance(completion, Completion)
    assert [json.loads(t) for t in completion.texts] == [{"reason": "reason 0"}, {"reason": "reason 1"}]


def test_the_removed_guided_decoding_is_never_used(standin: ModuleType) -> None:
    # The stand-in refuses it, as vLLM >= 0.12 does: the schema test above proves we pass structured_outputs.
    with pytest.raises(TypeError):
        standin.SamplingParams(guided_decoding={"json": SCHEMA})
    (error,) = complete_all(VLLMBackend(MODEL), [user("x", params={"extra_body": {"guided_json": SCHEMA}})])
    assert isinstance(error, BackendError) and not error.retryable
    assert "guided_json" in str(error) and "structured_outputs" in str(error)
    assert chat_calls(standin) == []  # refused before vLLM was asked


def test_structured_outputs_in_extra_body(standin: ModuleType) -> None:
    complete_all(VLLMBackend(MODEL), [user("x", params={"extra_body": {"structured_outputs": {"regex": "[ab]"}}})])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert sp.structured_outputs == standin.StructuredOutputsParams(regex="[ab]")


def test_choices_constrain_decoding_when_the_request_carries_them(standin: ModuleType) -> None:
    request = Request([{"role": "user", "content": "sentiment?"}], choices=["positive", "negative"])
    (completion,) = complete_all(VLLMBackend(MODEL), [request])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert sp.structured_outputs == standin.StructuredOutputsParams(choice=["positive", "negative"])
    assert isinstance(completion, Completion) and completion.texts[0] in ("positive", "negative")


def test_greedy_with_several_samples_generates_once(standin: ModuleType) -> None:
    (completion,) = complete_all(VLLMBackend(MODEL), [user("hi there", n=3, params={"temperature": 0})])
    (sp,) = chat_calls(standin)[0].sampling_params
    assert (sp.n, sp.temperature) == (1, 0)  # vLLM refuses n > 1 when sampling greedily
    assert isinstance(completion, Completion)
    assert completion.texts == ["stand-in reply 0 to: hi there"] * 3
    assert completion.completion_tokens == 3 * 6  # counted as three samples
    assert completion.finish_reasons == ["stop"] * 3


def test_a_bad_value_fails_its_request_only(standin: ModuleType) -> None:
    bad, good = complete_all(VLLMBackend(MODEL), [user("a", params={"top_p": 1.5}), user("b")])
    assert isinstance(bad, BackendError) and "top_p" in str(bad) and not bad.retryable
    assert isinstance(good, Completion)
    assert [len(c.messages) for c in chat_calls(standin)] == [1]


# --- prefill and accounting ---------------------------------------------------------------


def test_a_prefill_continues_the_final_message(standin: ModuleType) -> None:
    prefill = Request([{"role": "user", "content": "Review: fine"}, {"role": "assistant", "content": "Sentiment:"}])
    results = complete_all(VLLMBackend(MODEL), [user("plain 1"), prefill, user("plain 2")])
    plain, continued = chat_calls(standin)  # chat() takes the flags once per call: one call per kind
    assert (plain.add_generation_prompt, plain.continue_final_message) == (True, False)
    assert [c[-1]["content"] for c in plain.messages] == ["plain 1", "plain 2"]
    assert (continued.add_generation_prompt, continued.continue_final_message) == (False, True)
    assert continued.messages == [prefill.messages]
    assert [r.texts[0] for r in results] == [  # type: ignore[union-attr]
        "stand-in reply 0 to: plain 1", "stand-in reply 0 to: Sentiment:", "stand-in reply 0 to: plain 2"]


def test_token_accounting_and_finish_reasons(standin: ModuleType) -> None:
    (completion,) = complete_all(VLLMBackend(MODEL), [user("one two three", n=2, params={"max_tokens": 4})])
    assert isinstance(completion, Completion)
    # "<|user|> one two three <|assistant|>" is 5 tokens to the stand-in, shared by both samples
    assert completion.prompt_tokens == 5
    assert completion.texts == ["stand-in reply 0 to:", "stand-in reply 1 to:"]  # cut at max_tokens
    assert completion.completion_tokens == 4 + 4
    assert completion.finish_reasons == ["length", "length"]


# --- errors -------------------------------------------------------------------------------


def test_an_engine_error_fails_only_the_requests_that_caused_it(standin: ModuleType) -> None:
    requests = [user(f"row {i}") for i in range(8)]
    requests[5] = user("row 5 <too long>")
    results = complete_all(VLLMBackend(MODEL), requests)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [5]
    error = results[5]
    assert isinstance(error, BackendError) and not error.retryable
    assert "longer than the maximum model length" in str(error) and MODEL in str(error)
    assert all(isinstance(r, Completion) for i, r in enumerate(results) if i != 5)
    # the failed call of 8 was split in halves until the bad request stood alone:
    # 8 fails; 0-3 pass; 4-7 fail; 4-5 fail; 4 passes; 5 fails alone; 6-7 pass
    assert [len(c.messages) for c in chat_calls(standin)] == [8, 4, 4, 2, 1, 1, 2]


def test_a_dead_engine_fails_the_chunk_without_retry(standin: ModuleType) -> None:
    results = complete_all(VLLMBackend(MODEL), [user("a"), user("b <engine dead>"), user("c")])
    assert all(isinstance(r, BackendError) and not r.retryable and "engine died" in str(r) for r in results)
    assert [len(c.messages) for c in chat_calls(standin)] == [3]  # no bisecting a dead engine


def test_transient_failures_are_retryable(standin: ModuleType) -> None:
    retry, finish_error, fine = complete_all(VLLMBackend(MODEL), [user("<retry>"), user("<finish error>"),
                                                                   user("fine")])
    assert isinstance(retry, BackendError) and retry.retryable
    assert isinstance(finish_error, BackendError) and finish_error.retryable
    assert isinstance(fine, Completion)


def test_check_loads_the_model_once_in_the_worker_thread(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL, engine_args={"max_model_len": 4096, "gpu_memory_utilization": 0.5})

    async def twice(b: VLLMBackend) -> None:
        await b.check()
        await b.check()
        await b.complete(user("hi"))

    use(backend, twice)
    (llm,) = standin.LLM.instances
    assert (llm.model, llm.engine_args) == (MODEL, {"max_model_len": 4096, "gpu_memory_utilization": 0.5})
    assert llm.thread.startswith("retort-vllm") and llm.thread != threading.current_thread().name
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # vLLM's logs stay off `--json` stdout


def test_a_bad_model_fails_at_check(standin: ModuleType) -> None:
    backend = VLLMBackend("missing/model")
    with pytest.raises(BackendError, match="could not load the model: OSError: missing/model is not"):
        use(backend, lambda b: b.check())
    (error,) = complete_all(VLLMBackend("missing/model"), [user("hi")])  # without check: the call fails, no hang
    assert isinstance(error, BackendError) and "could not load the model" in str(error)


def test_a_missing_vllm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    with pytest.raises(UserError, match=r'pip install "retort\[vllm\]"'):
        use(VLLMBackend(MODEL), lambda b: b.check())
    (error,) = complete_all(VLLMBackend(MODEL), [user("hi")])
    assert isinstance(error, BackendError) and 'pip install "retort[vllm]"' in str(error)


def test_a_vllm_without_structured_outputs_is_too_old(standin: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys.modules["vllm.sampling_params"], "StructuredOutputsParams")  # as before 0.10.2
    with pytest.raises(UserError, match=r"too old: the vllm backend needs vllm>=0\.10\.2"):
        use(VLLMBackend(MODEL), lambda b: b.check())


def test_importing_the_backend_does_not_import_vllm() -> None:
    _forget_vllm()
    from retort.backends import vllm as module

    assert module.VLLMBackend is VLLMBackend and "vllm" not in sys.modules


def test_aclose_shuts_the_worker_thread_down(standin: ModuleType) -> None:
    backend = VLLMBackend(MODEL)
    complete_all(backend, [user("hi")])
    assert backend._executor is None and backend._llm is None
    assert not [t for t in threading.enumerate() if t.name.startswith("retort-vllm")]


# --- configuration ------------------------------------------------------------------------


def test_from_config() -> None:
    backend = from_config({"backend": "vllm", "name": "default", "model": MODEL, "chunk_size": 64,
                           "engine_args": {"gpu_memory_utilization": 0.8, "tensor_parallel_size": 2}})
    assert (backend.model, backend.chunk_size, backend.max_concurrency) == (MODEL, 64, 128)
    assert backend.identity == f"vllm:{MODEL}"  # speed-only engine args keep the cache
    pinned = from_config({"model": MODEL, "engine_args": {"revision": "abc123", "dtype": "bfloat16"}})
    assert pinned.identity.startswith(f"vllm:{MODEL}+") and len(pinned.identity) == len(f"vllm:{MODEL}+") + 8
    assert from_config({"model": MODEL, "identity": "vllm:mine"}).identity == "vllm:mine"
    with pytest.raises(SpecError, match="needs `model`"):
        from_config({"backend": "vllm"})
    with pytest.raises(SpecError, match="'base_url' does not apply to backend 'vllm'"):
        from_config({"model": MODEL, "base_url": "http://x/v1"})
    with pytest.raises(SpecError, match="not in engine_args"):
        from_config({"model": MODEL, "engine_args": {"model": "other"}})
    with pytest.raises(SpecError, match="chunk_size must be a positive integer"):
        from_config({"model": MODEL, "chunk_size": 0})


def test_create_and_the_test_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    config = backends.parse_target(f"vllm:{MODEL}")
    with pytest.raises(BackendError, match="disabled here"):  # tests cannot reach vLLM by accident
        backends.create("default", config)
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", "vllm")
    backend = backends.create("default", {**config, "name": "default"})
    assert isinstance(backend, VLLMBackend) and backend.identity == f"vllm:{MODEL}"


# --- a pipeline through the CLI and the runner --------------------------------------------

PIPELINE = """\
name: vsmoke
input: {path: data/example.jsonl}
params: {labels: [positive, negative]}
stages:
  - name: classify
    prompt: example/classify            # ends with an assistant prefill, "Sentiment:"
    params: {temperature: 0, max_tokens: 8}
    parse: {choice: "{{ params.labels }}"}
    output: prediction
  - name: explain
    from: classify
    template: 'Why is "{{ text }}" {{ prediction }}? Answer in JSON.'
    samples: 2
    params: {temperature: 0.7, max_tokens: 64, seed: 3}
    parse: {json: {schema: {type: object, properties: {reason: {type: string, maxLength: 40}}, required: [reason]}}}
  - name: score
    python: example.score
    from: classify
"""


def test_a_pipeline_through_the_cli_runs_batched_and_caches(standin: ModuleType, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", "vllm")  # this test opts in to the (stand-in) vllm backend
    monkeypatch.setattr(vllm_backend, "WINDOW", 0.5)  # a stage's 4 requests surely share one chunk

    def reply(conversation: list[dict[str, str]], sp: Any, k: int) -> str | None:
        if conversation[-1]["role"] == "assistant":  # the classify prefill: answer like a model would
            return " positive" if any(w in conversation[-2]["content"] for w in ("warm", "best")) else " negative"
        return None

    monkeypatch.setattr(standin, "REPLY", reply)
    ws = tmp_path / "ws"
    assert main(["init", str(ws)]) == 0
    (ws / "pipelines" / "vsmoke.yaml").write_text(PIPELINE)
    capsys.readouterr()
    argv = ["-C", str(ws), "run", "vsmoke", "--model", f"default=vllm:{MODEL}", "--json", "-q"]

    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["calls_made"], first["cache_hits"], first["failures"], first["parse_errors"]) == (12, 0, 0, 0)
    classify, explain = chat_calls(standin)  # one chat call per prompt stage
    assert len(classify.messages) == 4 and classify.continue_final_message and not classify.add_generation_prompt
    assert len(explain.messages) == 4 and explain.add_generation_prompt
    sp = explain.sampling_params[0]
    assert (sp.n, sp.temperature, sp.max_tokens, sp.seed) == (2, 0.7, 64, 3)
    assert sp.structured_outputs.json["properties"]["reason"]["maxLength"] == 40

    assert main(argv) == 0  # the rerun: every call from the cache
    second = json.loads(capsys.readouterr().out)
    assert (second["calls_made"], second["cache_hits"]) == (0, 12)
    assert len(standin.LLM.instances) == 2 and standin.LLM.instances[1].calls == []

    con = duckdb.connect(str(ws / ".retort" / "retort.duckdb"), read_only=True)
    try:
        rows = con.sql("SELECT text, label, prediction FROM main.classify ORDER BY _id").fetchall()
        assert len(rows) == 4 and all(label == prediction for _, label, prediction in rows)
        reasons = con.sql("SELECT reason FROM main.explain WHERE _error IS NULL ORDER BY _id").fetchall()
        assert sorted(r for (r,) in reasons) == ["reason 0"] * 4 + ["reason 1"] * 4
        calls = con.sql("SELECT model, count(*) FROM calls GROUP BY model").fetchall()
        assert calls == [(f"vllm:{MODEL}", 12)]
        (accuracy,) = con.sql("SELECT value FROM metrics WHERE name = 'accuracy'").fetchall()[-1]
        assert accuracy == 1.0
    finally:
        con.close()


def test_choice_stage_options_reach_vllm_as_structured_choice(standin: ModuleType, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner passes a choice stage's options to a backend that constrains decoding (and only to it)."""
    from retort.cache import Cache
    from retort.runner import Runner
    from retort.spec import load_pipeline
    from retort.workspace import Workspace

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text('{"text": "good"}\n{"text": "bad"}\n')
    (tmp_path / "p.yaml").write_text(
        "input: {path: data/rows.jsonl}\nmodels:\n  default: {backend: vllm, model: tiny}\n"
        "stages:\n  - {name: c, template: 'Sentiment of {{ text }}?', parse: {choice: [positive, negative]}}\n")
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", "vllm")
    ws = Workspace(tmp_path)
    spec, source = load_pipeline(tmp_path / "p.yaml")
    cache = Cache(ws.db_path)
    try:
        asyncio.run(Runner(ws, spec, source, cache).execute())
    finally:
        cache.close()
    params = [p for call in chat_calls(standin) for p in call.sampling_params]
    assert len(params) == 2
    assert all(p.structured_outputs.choice == ["positive", "negative"] for p in params)
