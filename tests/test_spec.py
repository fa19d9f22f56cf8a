from __future__ import annotations

from pathlib import Path

import pytest

from retort.errors import SpecError
from retort.spec import ChoiceRule, PromptStage, SqlStage, json_schema, load_pipeline

GOOD = """\
input:
  path: data/x.jsonl
models:
  teacher:
    backend: openai
    model: ${TEACHER_MODEL:-gpt-4o-mini}
    base_url: ${TEACHER_URL:-http://127.0.0.1:8000/v1}
stages:
  - name: ask
    template: "Q: {{ text }}"
    model: teacher
    samples: 2
  - name: keep
    sql: SELECT * FROM ask
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_loads_stages_by_kind_with_env_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEACHER_MODEL", raising=False)
    monkeypatch.setenv("TEACHER_URL", "http://10.0.0.1:9/v1")
    spec, _ = load_pipeline(write(tmp_path, GOOD))
    assert isinstance(spec.stages[0], PromptStage) and isinstance(spec.stages[1], SqlStage)
    assert spec.models["teacher"].model == "gpt-4o-mini"
    assert spec.models["teacher"].base_url == "http://10.0.0.1:9/v1"
    assert spec.name == "p"


def test_set_overrides_address_stages_by_name(tmp_path: Path) -> None:
    spec, _ = load_pipeline(write(tmp_path, GOOD), ["stages.ask.samples=8", "input.limit=3",
                                                     "params.labels=[a, b]"])
    assert spec.stages[0].samples == 8  # type: ignore[union-attr]
    assert spec.input.limit == 3
    assert spec.params["labels"] == ["a", "b"]


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("    samples: 2\n", "    samples: 2\n    bogus: 1\n"),
     "p.yaml:13 stages[0] (ask).bogus: unknown field"),
    (GOOD.replace("samples: 2", "samples: 0"), "p.yaml:12 stages[0] (ask).samples: input should be greater"),
    (GOOD.replace("  path: data/x.jsonl\n", "  limit: 2\n"), "p.yaml:1 input.path: field required"),
    (GOOD.replace("name: keep", "name: ask"), "p.yaml:13 stages[1].name: stage name 'ask' is used twice"),
    (GOOD.replace("stages:", "stages:\n  - name: [oops"), "p.yaml:10: malformed YAML"),
    (GOOD.replace("${TEACHER_MODEL:-gpt-4o-mini}", "${RETORT_SURELY_UNSET_VAR}"),
     "p.yaml:6 models.teacher.model: environment variable RETORT_SURELY_UNSET_VAR is not set"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SpecError) as err:
        load_pipeline(write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path / expected.split(":")[0]) + ":" + expected.split(":", 1)[1]), \
        str(err.value)


def test_bad_override_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no item 'nope'"):
        load_pipeline(write(tmp_path, GOOD), ["stages.nope.samples=2"])
    with pytest.raises(SpecError, match=r"expected key\.path=value"):
        load_pipeline(write(tmp_path, GOOD), ["samples"])


def test_json_schema_describes_stage_kinds() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    assert {"PromptStage", "SqlStage", "PythonStage", "OpenAIModel"} <= set(defs)
    assert defs["PromptStage"]["additionalProperties"] is False
    assert "from" in defs["PromptStage"]["properties"]


def test_stage_values_follow_params(tmp_path: Path) -> None:
    text = GOOD.replace("samples: 2", 'samples: "{{ params.k }}"\n    parse: {choice: "{{ params.labels }}"}')
    text = text.replace("stages:", "params: {k: 3, labels: [good, bad]}\nstages:")
    spec, _ = load_pipeline(write(tmp_path, text), ["params.k=5"])
    stage = spec.stages[0]
    assert isinstance(stage, PromptStage)
    assert stage.samples == 5 and isinstance(stage.parse, ChoiceRule) and stage.parse.choice.options == ["good", "bad"]


def test_stage_names_of_retorts_own_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"p.yaml:13 stages\[1\].name: stage name 'metrics' is taken"):
        load_pipeline(write(tmp_path, GOOD.replace("name: keep", "name: metrics")))
