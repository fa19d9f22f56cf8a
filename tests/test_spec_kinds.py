"""Model settings typed by backend and `parse:` rules typed by kind: the JSON Schema an editor reads, the
one-line located errors of `retort validate`, and every way of naming a model that worked before."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

import retort
from retort import backends
from retort.backends.base import RUNNER_KEYS
from retort.errors import SpecError
from retort.spec import (
    MODEL_KINDS,
    AnswerRule,
    ChoiceRule,
    FunctionRule,
    JsonRule,
    LangChainModel,
    LocalModel,
    ModelSpec,
    OpenAIModel,
    ParseRule,
    ScriptedModel,
    TextRule,
    VLLMModel,
    json_schema,
    load_pipeline,
)
from tests.conftest import ROOT, run_cli

# Each backend's own settings (ModelSpec holds the shared ones): what the schema must offer in its branch.
OWN = {
    "local": {"model_path"},
    "openai": {"model", "base_url", "api_key_env", "max_concurrency", "timeout", "extra_body", "transport",
               "max_response_mb", "structured_output"},
    "vllm": {"model", "engine_args", "max_concurrency", "chunk_size"},
    "langchain": {"factory", "model", "max_concurrency", "structured_output", "extra_body"},
    "scripted": {"replies", "function", "cycle", "delay", "max_concurrency"},
}
SHARED = {"backend", "identity", "rpm", "tpm", "max_retry_after", "price_input", "price_output"}


def _ref(schema: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    return schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def _own(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """A property's own alternatives, without the `{{ params.x }}` string every stage value also takes."""
    alternatives = prop["anyOf"]
    assert "params" in alternatives[-1]["pattern"]
    return alternatives[0]["anyOf"] if "anyOf" in alternatives[0] else alternatives[:1]  # type: ignore[no-any-return]


def test_the_schema_from_the_cli_has_one_branch_per_backend_with_its_own_fields(workspace: Path) -> None:
    done = run_cli("schema", cwd=workspace)
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    short, typed = schema["properties"]["models"]["additionalProperties"]["anyOf"]
    assert short == {"type": "string"}  # teacher: openai:gpt-4o-mini
    branches = [_ref(schema, ref) for ref in typed["oneOf"]]
    by_backend = {b["properties"]["backend"]["const"]: b for b in branches}
    assert set(by_backend) == set(OWN)
    for kind, branch in by_backend.items():
        assert set(branch["properties"]) == OWN[kind] | SHARED, kind
        assert branch["additionalProperties"] is False  # an editor flags another backend's key
    assert "backend" not in by_backend["local"].get("required", [])  # the default backend
    assert all("backend" in by_backend[k]["required"] for k in OWN if k != "local")
    assert by_backend["openai"]["properties"]["transport"]["anyOf"][0]["enum"] == ["auto", "fast", "aiohttp", "sdk"]


def test_the_schema_offers_each_parse_kind_with_its_short_forms() -> None:
    schema = json_schema()
    parse = _own(schema["$defs"]["PromptStage"]["properties"]["parse"])
    assert parse[0]["enum"] == ["text", "json", "answer"]  # the bare words
    rules = {next(iter(_ref(schema, r)["required"])): _ref(schema, r) for r in parse[1]["oneOf"]}
    assert set(rules) == {"text", "regex", "json", "choice", "answer", "function"}
    regex = _own(rules["regex"]["properties"]["regex"])
    assert regex[0] == {"type": "string"} and set(_ref(schema, regex[1])["properties"]) == {"pattern", "flags"}
    assert set(rules["choice"]["properties"]) == {"choice", "default"}  # {choice: [a, b], default: c}
    choice = _own(rules["choice"]["properties"]["choice"])
    assert choice[0]["type"] == "array" and set(_ref(schema, choice[1])["properties"]) == {"options", "default"}
    assert set(_ref(schema, _own(rules["json"]["properties"]["json"])[0])["properties"]) == {"schema", "model"}
    assert set(_ref(schema, _own(rules["answer"]["properties"]["answer"])[0])["properties"]) == {
        "rules", "fallback_last_number"}
    assert set(rules["function"]["properties"]) == {"function", "columns"}


SPEC = """\
input: {path: data/rows.jsonl}
models:
  default:
    backend: scripted
    function: "retort.backends.scripted:echo"
    max_concurrency: 4
stages:
  - name: ask
    template: "Q {{ text }}"
    parse:
      choice:
        options: [yes_, no_]
        default: no_
"""


@pytest.mark.parametrize(("edit", "line", "field", "words"), [
    (("    max_concurrency: 4\n", "    max_concurrency: 4\n    base_url: http://127.0.0.1:9/v1\n"),
     7, "models.default.base_url", "a setting of backend openai, not scripted"),
    (("    backend: scripted\n", "    backend: local\n"),  # local takes neither function nor max_concurrency
     5, "models.default.function", "a setting of backend scripted, not local"),
    (("    backend: scripted\n", "    backend: scriptd\n"), 4, "models.default.backend", "unknown backend 'scriptd'"),
    (("      choice:\n", "      choise:\n"), 10, "stages[0] (ask).parse",
     "expected exactly one parse kind (text, regex, json, choice, answer, function), found: choise "
     "(did you mean 'choice'?)"),
    (("        default: no_\n", "        defualt: no_\n"), 13, "stages[0] (ask).parse.choice.defualt",
     "choice: unknown option 'defualt'; expected: default, options"),
    (("[yes_, no_]", "[yes, no]"), 12, "stages[0] (ask).parse.choice.options",
     "option True was read as a boolean; quote it"),
    (("    parse:\n      choice:\n        options: [yes_, no_]\n        default: no_\n",
      "    parse:\n      regex:\n        pattern: '(?P<x'\n"), 11, "stages[0] (ask).parse.regex",
     "invalid pattern '(?P<x'"),
])
def test_a_misplaced_key_is_one_located_line_from_the_cli(workspace: Path, edit: tuple[str, str], line: int,
                                                           field: str, words: str) -> None:
    assert edit[0] in SPEC
    (workspace / "pipelines" / "p.yaml").write_text(SPEC.replace(*edit))
    done = run_cli("validate", "p", cwd=workspace)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {workspace / 'pipelines' / 'p.yaml'}:{line} {field}: {words}"), lines[0]


def test_an_override_is_checked_like_the_file(workspace: Path) -> None:
    (workspace / "pipelines" / "p.yaml").write_text(SPEC)
    done = run_cli("validate", "p", "--set", "models.default.api_key_env=KEY", cwd=workspace)
    assert done.returncode == 2 and "models.default.api_key_env: a setting of backend openai, not scripted" \
        in done.stderr, done.stderr
    switched = run_cli("validate", "p", "--set", 'models.default={backend: openai, model: m, base_url: "http://x"}',
                       cwd=workspace)
    assert "models.default" not in switched.stderr, switched.stderr  # the whole entry replaced: an openai one


BUILT_IN = sorted((ROOT / "pipelines").glob("*.yaml"))


def test_every_built_in_pipeline_loads_with_typed_models_and_rules() -> None:
    assert len(BUILT_IN) >= 8
    seen: set[type[ParseRule]] = set()
    for path in BUILT_IN:
        spec, _ = load_pipeline(path)
        assert all(isinstance(m, LocalModel) for m in spec.models.values()), path.stem
        assert type(spec.model_for("default")) is LocalModel
        for stage in spec.stages:
            rule = getattr(stage, "parse", None)
            if rule is None:
                continue
            assert isinstance(rule, ParseRule), (path.stem, stage.name)
            seen.add(type(rule))
            if isinstance(rule, ChoiceRule):  # {choice: "{{ params.labels }}"} took the params' list
                assert rule.choice.options == [str(x) for x in spec.params.get("labels", rule.choice.options)]
            if isinstance(rule, AnswerRule):  # {answer: {rules: "{{ params.answers }}"}}
                assert rule.answer.rules == spec.params.get("answers", "lenient"), path.stem
            if isinstance(rule, FunctionRule):
                assert ":" in rule.function.name
    assert {ChoiceRule, AnswerRule, FunctionRule, JsonRule, TextRule} <= seen


def test_every_built_in_pipeline_is_valid_for_an_editor_reading_the_schema() -> None:
    """What `retort schema` promises an editor: the built-in pipelines as written (`{{ params.x }}` in stage
    values included) raise no complaint, and a key of another backend does."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(json_schema())
    for path in BUILT_IN:
        data = yaml.safe_load(path.read_text())
        assert [e.message for e in validator.iter_errors(data)] == [], path.stem
    data["models"] = {"default": {"backend": "scripted", "replies": ["x"], "base_url": "http://127.0.0.1:9/v1"}}
    assert not validator.is_valid(data)
    data["models"] = {"default": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}}
    assert validator.is_valid(data)


def test_params_reach_a_parse_rule_and_are_checked_there() -> None:
    spec, _ = load_pipeline(ROOT / "pipelines" / "direct.yaml", ["params.labels=[good, bad, mixed]"])
    assert [s.parse.choice.options for s in spec.stages if isinstance(getattr(s, "parse", None), ChoiceRule)] \
        == [["good", "bad", "mixed"]]
    with pytest.raises(SpecError, match=r"direct.yaml:19 stages\[0\] \(classify\)\.parse\.choice\.options: "
                                        r"options 'good' and 'Good' read the same"):
        load_pipeline(ROOT / "pipelines" / "direct.yaml", ["params.labels=[good, Good]"])


@pytest.mark.parametrize(("target", "kind", "fields"), [
    ("local", LocalModel, {}),
    ("openai:gpt-4o-mini", OpenAIModel, {"model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}),
    ("http://127.0.0.1:8000/v1#served", OpenAIModel, {"model": "served", "base_url": "http://127.0.0.1:8000/v1"}),
    ("vllm:Qwen/Qwen2.5-0.5B-Instruct", VLLMModel, {"model": "Qwen/Qwen2.5-0.5B-Instruct"}),
    ("scripted:retort.backends.scripted:echo", ScriptedModel, {"function": "retort.backends.scripted:echo"}),
    ("langchain:mymod:make", LangChainModel, {"factory": "mymod:make"}),
])
def test_every_model_target_short_form_is_its_backends_model(target: str, kind: type[ModelSpec],
                                                              fields: dict[str, Any]) -> None:
    model = backends.settings("default", {**backends.parse_target(target), "name": "default"})
    assert type(model) is kind and {k: getattr(model, k) for k in fields} == fields


SHORT = """\
input: {path: data/rows.jsonl}
models:
  default: scripted:retort.backends.scripted:echo
  teacher: openai:gpt-4o-mini
  judge: "http://127.0.0.1:8000/v1#qwen"
stages:
  - {name: ask, template: "Q {{ text }}", model: teacher}
"""


def test_a_model_entry_may_be_written_as_a_target(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SHORT)
    spec, _ = load_pipeline(path)
    assert spec.models["default"] == ScriptedModel(backend="scripted", function="retort.backends.scripted:echo")
    assert spec.models["teacher"] == OpenAIModel(backend="openai", model="gpt-4o-mini",
                                                 base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")
    assert spec.models["judge"] == OpenAIModel(backend="openai", model="qwen", base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(SpecError, match=r"p.yaml:4 models.teacher: 'opneai:gpt-4o-mini': expected local, a URL"):
        load_pipeline(path, ["models.teacher=opneai:gpt-4o-mini"])


def test_a_target_from_python_is_checked_like_a_pipelines_entry(workspace: Path) -> None:
    (workspace / "pipelines" / "p.yaml").write_text(SPEC)
    (workspace / "data" / "rows.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(SpecError, match=r"^models\.default\.chunk_size: a setting of backend vllm, not scripted"):
        retort.run("p", workspace=workspace, models={"default": {"backend": "scripted", "replies": ["yes_"],
                                                                 "chunk_size": 8}})
    result = retort.run("p", workspace=workspace, models={"default": "scripted:retort.backends.scripted:echo"})
    assert len(result.table("ask")) == 1  # the short form still works from Python


@pytest.mark.parametrize("kind", ["local", "openai", "vllm", "langchain"])
def test_each_backend_reads_exactly_the_settings_its_model_declares(kind: str) -> None:
    """A backend's from_config still checks its keys (for callers that skip the spec); the two lists agree."""
    module = importlib.import_module(f"retort.backends.{kind}")
    declared = set(MODEL_KINDS[kind].model_fields) - RUNNER_KEYS
    assert set(module._CONFIG_KEYS) - {"workspace"} == declared
