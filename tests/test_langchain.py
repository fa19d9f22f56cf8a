"""LangChain both ways: a chat model as a backend, a pipeline as a Runnable.

The chat models are langchain-core's own fakes (FakeListChatModel) and a small
BaseChatModel that logs what it receives, written into the test workspace's
evaluators/ and named by `factory: "mymod:attr"`, as a user would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.runnables import RunnableLambda

from retort.backends import create
from retort.backends.base import Request
from retort.backends.langchain import LangChainBackend, from_config, is_secret_name, public_params, retryable_error
from retort.errors import BackendError, DatasetError, NotFoundError, SpecError, UserError
from retort.runnable import PipelineRunnable
from retort.workspace import Workspace
from tests.conftest import db_rows as query
from tests.conftest import run_cli

ALLOW = {"RETORT_ALLOWED_BACKENDS": "scripted,langchain"}
SECRET = "sk-test-DO-NOT-LEAK-1234"
TOKEN = "hf_DO-NOT-LEAK-5678"
ROWS = [{"text": "alpha"}, {"text": "bravo"}, {"text": "charlie"}]

MYMOD = f'''\
"""Chat models for the tests: LangChain's own fake, and a recorder that logs what it receives."""
import json
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import SecretStr

LOG = Path(__file__).resolve().parent.parent / "received.jsonl"


def record(entry):
    with LOG.open("a") as f:
        f.write(json.dumps(entry, default=str) + "\\n")


class RateLimitError(Exception):
    pass


class Recorder(BaseChatModel):
    model_name: str = "recorder-1"
    temperature: float = 1.0
    max_tokens: int | None = None
    api_key: SecretStr = SecretStr("{SECRET}")
    fail_on: str | None = None
    leak: bool = False

    @property
    def _llm_type(self):
        return "recorder"

    @property
    def _identifying_params(self):  # a careless integration: secrets among its identifying params
        return {{"model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "api_key": self.api_key.get_secret_value(), "access_token": "{TOKEN}",
                "default_headers": {{"x-api-key": "{SECRET}", "user-agent": "tests"}}}}

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        record({{"messages": [[m.type, m.content] for m in messages], "stop": stop,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "kwargs": kwargs}})
        text = next(m.content for m in reversed(messages) if isinstance(m, HumanMessage))
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("boom: the model exploded" + (f" (key {{self.api_key.get_secret_value()}})"
                                                             if self.leak else ""))
        message = AIMessage(content=f"reply to {{text}}", response_metadata={{"finish_reason": "stop"}},
                            usage_metadata={{"input_tokens": 11, "output_tokens": 3, "total_tokens": 14}})
        return ChatResult(generations=[ChatGeneration(message=message)])


class ToolRecorder(Recorder):
    """Supports structured output the langchain-core way: through bind_tools."""

    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def with_structured_output(self, schema, *, include_raw=False, **kwargs):
        record({{"structured": kwargs.get("method"), "title": schema.get("title")}})
        return super().with_structured_output(schema, include_raw=include_raw, **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        tools = kwargs.get("tools")
        if not tools:
            return super()._generate(messages, stop, run_manager, **kwargs)
        record({{"tools": [t["function"]["name"] for t in tools]}})
        text = next(m.content for m in reversed(messages) if isinstance(m, HumanMessage))
        call = {{"name": tools[0]["function"]["name"], "args": {{"label": "pos", "length": len(text)}},
                "id": "call-1", "type": "tool_call"}}
        message = AIMessage(content="", tool_calls=[call],
                            usage_metadata={{"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}})
        return ChatResult(generations=[ChatGeneration(message=message)])


def make():
    return Recorder()


def make_named(model="unnamed"):
    return Recorder(model_name=model)


def make_list():
    return FakeListChatModel(responses=["first", "second", "third"])


def make_json():
    return FakeListChatModel(responses=['{{"label": "neg", "length": 1}}'])


def make_failing():
    return Recorder(fail_on="bravo", leak=True)


def make_tools():
    return ToolRecorder()


def not_a_model():
    return "hello"
'''

TEMPLATE = """\
{% block system %}You label texts.{% endblock %}
{% block user %}Text: {{ text }}{% endblock %}
{% block assistant %}Label:{% endblock %}
"""


def pipeline(factory: str, *, params: str = "{}", parse: str = "text", extra: str = "") -> str:
    return f"""\
name: lc
input: {{path: data/rows.jsonl, limit: 1}}
models:
  default: {{backend: langchain, factory: "{factory}", max_concurrency: 1}}
stages:
  - name: pred
    prompt: demo/ask
    params: {params}
    parse: {parse}
{extra}"""


@pytest.fixture
def ws(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace whose models are LangChain chat models; the langchain backend is allowed here."""
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", ALLOW["RETORT_ALLOWED_BACKENDS"])  # after the autouse guard
    (workspace / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (workspace / "prompts" / "demo").mkdir()
    (workspace / "prompts" / "demo" / "ask.j2").write_text(TEMPLATE)
    (workspace / "evaluators" / "mymod.py").write_text(MYMOD)
    (workspace / "pipelines" / "lc.yaml").write_text(
        pipeline("mymod:make", params="{temperature: 0.3, max_tokens: 16, stop: [END], seed: 7}"))
    return workspace


def received(ws: Path) -> list[dict[str, Any]]:
    log = ws / "received.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def cli_run(ws: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = run_cli("run", *args, "--json", "-q", "--limit", "3", cwd=ws, env=ALLOW)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}, out.stderr


# --- the backend, end to end through the CLI -----------------------------------------------


def test_cli_run_converts_messages_maps_params_and_caches(ws: Path) -> None:
    code, result, err = cli_run(ws, "lc")
    assert code == 0, err
    assert result["calls_made"] == 3 and result["cache_hits"] == 0
    assert result["prompt_tokens"] == 33 and result["completion_tokens"] == 9  # from usage_metadata
    rows = query(ws, "SELECT text, pred FROM main.pred ORDER BY _id")
    assert rows == [("alpha", "reply to Text: alpha"), ("bravo", "reply to Text: bravo"),
                    ("charlie", "reply to Text: charlie")]
    seen = received(ws)
    assert len(seen) == 3
    first = next(s for s in seen if "alpha" in s["messages"][1][1])
    assert first["messages"] == [["system", "You label texts."], ["human", "Text: alpha"], ["ai", "Label:"]]
    assert first["stop"] == ["END"]
    assert first["temperature"] == 0.3 and first["max_tokens"] == 16  # set on the model's own fields
    assert first["kwargs"] == {"seed": 7}  # no seed field: an invocation keyword argument
    assert query(ws, "SELECT DISTINCT finish_reason FROM calls") == [("stop",)]

    code, again, err = cli_run(ws, "lc")
    assert code == 0, err
    assert again["calls_made"] == 0 and again["cache_hits"] == 3
    assert len(received(ws)) == 3  # the rerun reached no model


def test_cli_run_with_langchains_fake_list_chat_model(ws: Path) -> None:
    (ws / "pipelines" / "fake.yaml").write_text(pipeline("mymod:make_list", extra="    samples: 2\n"))
    code, result, err = cli_run(ws, "fake")
    assert code == 0, err
    assert result["calls_made"] == 6
    replies = [r[0] for r in query(ws, "SELECT pred FROM main.pred ORDER BY _id")]
    assert len(replies) == 6 and set(replies) == {"first", "second", "third"}
    assert query(ws, "SELECT DISTINCT model FROM calls")[0][0].startswith('langchain:mymod:make_list {"responses":')


def test_model_exception_is_a_recorded_failure_and_scrubbed(ws: Path) -> None:
    (ws / "pipelines" / "failing.yaml").write_text(pipeline("mymod:make_failing"))
    code, result, _ = cli_run(ws, "failing")
    assert code == 1  # failures > --max-failures 0
    assert result["failures"] == 1 and result["calls_made"] == 2
    assert [r[0] for r in query(ws, "SELECT text FROM run_1.pred ORDER BY _id")] == ["alpha", "charlie"]
    assert query(ws, "SELECT status FROM runs") == [("failed",)]  # kept by number, not made the latest
    (row_id, error, status), = query(ws, "SELECT row_id, error, status FROM failures")
    assert row_id == "1" and status is None
    assert "RuntimeError: boom: the model exploded" in error
    assert SECRET not in error and "(key ***)" in error  # the model's key scrubbed from the message
    assert sum("bravo" in s["messages"][1][1] for s in received(ws)) == 1  # not retryable: one attempt


def test_identity_keeps_no_secret(ws: Path) -> None:
    backend = from_config({"backend": "langchain", "factory": "mymod:make", "workspace": str(ws)})
    identity = backend.identity
    assert identity.startswith("langchain:mymod:make ")
    params = json.loads(identity.split(" ", 1)[1])
    assert params == {"model_name": "recorder-1", "temperature": 1.0, "default_headers": {"user-agent": "tests"}}
    assert SECRET not in identity and TOKEN not in identity and "api_key" not in identity

    code, _, err = cli_run(ws, "lc")
    assert code == 0, err
    assert query(ws, "SELECT DISTINCT model FROM calls") == [(identity,)]
    data = (ws / ".retort" / "retort.duckdb").read_bytes()
    assert b"recorder-1" in data  # the check below can see strings in this file
    assert SECRET.encode() not in data and TOKEN.encode() not in data


def test_structured_output_through_with_structured_output(ws: Path) -> None:
    schema = "{json: {schema: {type: object, properties: {label: {type: string}, length: {type: integer}}}}}"
    (ws / "pipelines" / "tools.yaml").write_text(pipeline("mymod:make_tools", parse=schema))
    code, result, err = cli_run(ws, "tools")
    assert code == 0, err
    assert result["prompt_tokens"] == 15  # the raw message's usage, seen through the structured chain
    rows = query(ws, "SELECT text, label, length FROM main.pred ORDER BY _id")
    assert rows == [("alpha", "pos", 11), ("bravo", "pos", 11), ("charlie", "pos", 13)]
    seen = received(ws)
    assert {"structured": "json_schema", "title": "output"} in seen
    assert {"tools": ["output"]} in seen


def test_structured_output_falls_back_to_text_and_the_json_parser(ws: Path) -> None:
    schema = "{json: {schema: {type: object, properties: {label: {type: string}, length: {type: integer}}}}}"
    (ws / "pipelines" / "plain.yaml").write_text(pipeline("mymod:make_json", parse=schema))
    code, _, err = cli_run(ws, "plain")
    assert code == 0, err
    assert query(ws, "SELECT DISTINCT label, length FROM main.pred") == [("neg", 1)]


# --- the backend, in process ----------------------------------------------------------------


class RateLimitError(Exception):
    pass


class Status(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


def test_retryable_by_class_name_or_status() -> None:
    assert retryable_error(RateLimitError("slow down")) == (True, None)
    assert retryable_error(TimeoutError()) == (True, None)
    assert retryable_error(ConnectionResetError()) == (True, None)
    assert retryable_error(Status(503)) == (True, 503)
    assert retryable_error(Status(429)) == (True, 429)
    assert retryable_error(Status(400)) == (False, 400)
    assert retryable_error(ValueError("bad request")) == (False, None)


def test_secret_names_and_public_params() -> None:
    for name in ("api_key", "openai_api_key", "apiKey", "access_token", "hf_token", "x-api-key", "client_secret",
                 "password", "Authorization"):
        assert is_secret_name(name), name
    for name in ("max_tokens", "top_k", "temperature", "model_name", "keep_alive"):
        assert not is_secret_name(name), name
    assert public_params({"base_url": "https://user:pw@host/v1", "client": object(), "stop": ["a"]}) == {
        "base_url": "https://***@host/v1", "stop": ["a"]}


def test_a_model_object_n_samples_and_seeds() -> None:
    chat = FakeListChatModel(responses=["a", "b", "c"])
    backend = LangChainBackend(chat, max_concurrency=2)
    assert backend.identity == ('langchain:langchain_core.language_models.fake_chat_models.FakeListChatModel '
                                '{"responses":["a","b","c"]}')
    completion = asyncio.run(backend.complete(Request([{"role": "user", "content": "hi"}], {"seed": 1}, n=3)))
    assert sorted(completion.texts) == ["a", "b", "c"] and len(completion.finish_reasons or []) == 3


def test_model_goes_to_a_factory_that_takes_it(ws: Path) -> None:
    named = from_config({"factory": "mymod:make_named", "model": "custom-7", "workspace": str(ws)})
    assert '"model_name":"custom-7"' in named.identity
    # A `model` kept from another backend (a model_targets switch) does not reach a factory without one.
    plain = from_config({"factory": "mymod:make", "model": "gpt-x", "workspace": str(ws)})
    assert '"model_name":"recorder-1"' in plain.identity


def test_config_errors(ws: Path) -> None:
    with pytest.raises(SpecError, match="needs `factory`"):
        from_config({"backend": "langchain"})
    with pytest.raises(SpecError, match="'base_url' does not apply"):
        from_config({"backend": "langchain", "factory": "mymod:make", "base_url": "http://x"})
    with pytest.raises(UserError, match="returned a str"):
        asyncio.run(from_config({"factory": "mymod:not_a_model", "workspace": str(ws)}).check())
    with pytest.raises(NotFoundError):
        asyncio.run(from_config({"factory": "no_such_module_here:make", "workspace": str(ws)}).check())


def test_the_test_guard_still_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETORT_ALLOWED_BACKENDS", "scripted")
    with pytest.raises(BackendError, match="disabled here"):
        create("default", {"backend": "langchain", "factory": "mymod:make"})


# --- the pipeline as a Runnable ---------------------------------------------------------------


def test_invoke_one_row_then_again_from_the_cache(ws: Path) -> None:
    runnable = PipelineRunnable("lc", workspace=ws)
    assert runnable.invoke({"text": "delta"}) == [{"text": "delta", "pred": "reply to Text: delta"}]
    assert runnable.invoke({"text": "delta"}) == [{"text": "delta", "pred": "reply to Text: delta"}]
    assert len(received(ws)) == 1  # the second invocation made no call, and no run: it was up to date
    assert runnable.invoke({"text": "echo"}) == [{"text": "echo", "pred": "reply to Text: echo"}]
    assert runnable.invoke({"text": "delta"}) == [{"text": "delta", "pred": "reply to Text: delta"}]
    assert len(received(ws)) == 2  # delta again, after echo: a new run, from the cache
    runs = query(ws, "SELECT stats->>'calls_made', stats->>'cache_hits', status FROM runs ORDER BY run_id")
    assert runs == [("1", "0", "ok"), ("1", "0", "ok"), ("0", "1", "ok")]


def test_invoke_runs_only_up_to_its_output_stage(ws: Path) -> None:
    scored = pipeline("mymod:make", extra="  - name: score\n    python: accuracy\n    from: pred\n"
                                          "    with: {prediction: pred, reference: label}\n")
    (ws / "pipelines" / "scored.yaml").write_text(scored.replace("name: lc", "name: scored"))
    rows = PipelineRunnable("scored", workspace=ws, output_stage="pred").invoke({"text": "golf"})  # no `label`
    assert rows == [{"text": "golf", "pred": "reply to Text: golf"}]
    tables = {t for (t,) in query(ws, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'run_1'")}
    assert tables == {"input", "pred"}  # the scoring stage, which needs a label, did not run


def test_invoke_a_list_keeps_input_order_and_lineage_on_request(ws: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(12)]  # "10" sorts before "2" as text, not as lineage
    out = PipelineRunnable("lc", workspace=ws, lineage=True).invoke(rows)
    assert [r["text"] for r in out] == [f"row {i}" for i in range(12)]
    assert [r["_id"] for r in out] == [f"{i}.0" for i in range(12)]
    assert out[0]["_parent"] == "0" and out[0]["_error"] is None


def test_batch_three_rows(ws: Path) -> None:
    runnable = PipelineRunnable("lc", workspace=ws)
    out = runnable.batch([{"text": "one"}, [{"text": "two"}, {"text": "three"}], {"text": "four"}])
    assert out == [[{"text": "one", "pred": "reply to Text: one"}],
                   [{"text": "two", "pred": "reply to Text: two"}, {"text": "three", "pred": "reply to Text: three"}],
                   [{"text": "four", "pred": "reply to Text: four"}]]
    assert query(ws, "SELECT count(*) FROM runs") == [(1,)]  # one run for the whole batch


def test_batch_over_an_aggregate_runs_each_input_alone(ws: Path) -> None:
    (ws / "pipelines" / "agg.yaml").write_text(pipeline(
        "mymod:make", extra="  - {name: total, sql: \"SELECT count(*) AS n FROM pred\"}\n"))
    out = PipelineRunnable("agg", workspace=ws).batch([{"text": "a"}, [{"text": "b"}, {"text": "c"}]])
    assert out == [[{"n": 1}], [{"n": 2}]]
    assert len(received(ws)) == 3  # the per-input runs took every call from the cache


def test_batch_with_a_failing_row(ws: Path) -> None:
    (ws / "pipelines" / "failing.yaml").write_text(pipeline("mymod:make_failing"))
    runnable = PipelineRunnable("failing", workspace=ws)
    out = runnable.batch([{"text": "alpha"}, {"text": "bravo"}], return_exceptions=True)
    assert out[0] == [{"text": "alpha", "pred": "reply to Text: alpha"}]
    assert isinstance(out[1], BackendError) and "boom" in str(out[1]) and SECRET not in str(out[1])
    with pytest.raises(BackendError, match="1 failed call"):
        runnable.invoke({"text": "bravo"})
    assert PipelineRunnable("failing", workspace=ws, max_failures=1).invoke({"text": "bravo"}) == []


def test_ainvoke_and_abatch(ws: Path) -> None:
    runnable = PipelineRunnable("lc", workspace=ws)

    async def main() -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
        one = await runnable.ainvoke({"text": "echo"})
        many = await runnable.abatch([{"text": "foxtrot"}, {"text": "golf"}])
        # Concurrent invocations on one DuckDB file take turns, without blocking the loop.
        both = await asyncio.gather(runnable.ainvoke({"text": "hotel"}), runnable.ainvoke({"text": "india"}))
        return one, many, list(both)

    one, many, both = asyncio.run(main())
    assert one == [{"text": "echo", "pred": "reply to Text: echo"}]
    assert [rows[0]["pred"] for rows in many] == ["reply to Text: foxtrot", "reply to Text: golf"]
    assert [rows[0]["pred"] for rows in both] == ["reply to Text: hotel", "reply to Text: india"]
    assert query(ws, "SELECT count(*) FROM runs WHERE status = 'ok'") == [(4,)]


def test_lcel_composition(ws: Path) -> None:
    chain = (RunnableLambda(lambda x: {"text": x}) | PipelineRunnable("lc", workspace=ws)
             | RunnableLambda(lambda rows: rows[0]["pred"]))
    assert chain.invoke("juliet") == "reply to Text: juliet"
    assert chain.batch(["kilo", "lima"]) == ["reply to Text: kilo", "reply to Text: lima"]
    assert asyncio.run(chain.ainvoke("juliet")) == "reply to Text: juliet"
    assert len(received(ws)) == 3


def test_model_targets_take_a_chat_model_object(ws: Path) -> None:
    runnable = PipelineRunnable("lc", workspace=ws,
                                model_targets={"default": FakeListChatModel(responses=["from the object"])})
    assert runnable.invoke({"text": "mike"}) == [{"text": "mike", "pred": "from the object"}]
    assert received(ws) == []


def test_constructor_errors(ws: Path) -> None:
    with pytest.raises(NotFoundError, match="no stage 'nope'"):
        PipelineRunnable("lc", workspace=ws, output_stage="nope")
    with pytest.raises(NotFoundError):
        PipelineRunnable("missing", workspace=Workspace(ws))
    with pytest.raises(UserError, match="a row"):
        PipelineRunnable("lc", workspace=ws).invoke("just text")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="the input rows have no column 'text'") as info:
        PipelineRunnable("lc", workspace=ws).invoke({"sentence": "no text column"})
    assert "input.jsonl" not in str(info.value)
