"""`retort init DIR`: a new workspace with the four folders and one working example."""

from __future__ import annotations

from pathlib import Path

from retort.errors import UserError

EXAMPLE_PIPELINE = """\
# yaml-language-server: $schema=../.retort/schema.json
# A working example: classify the sentiment of short texts, then score it.
# Run it with `retort run example` (the embedded model; no server, no key).
# Point it at a server: `retort run example --model default=http://127.0.0.1:8000/v1#MODEL`.
name: example
description: Sentiment of short texts, zero-shot, with accuracy and macro-F1.
input:
  path: data/example.jsonl
params:
  labels: [positive, negative]
stages:
  - name: classify
    prompt: example/classify
    params: {temperature: 0, max_tokens: 8}
    parse: {choice: "{{ params.labels }}"}
    output: prediction
  - name: score
    python: example.score
    from: classify
"""

EXAMPLE_PROMPT = """\
{% block system %}You label the sentiment of movie reviews. Answer with one word.{% endblock %}
{% block user %}Review: {{ text }}
Is this review {{ params.labels | join(" or ") }}?{% endblock %}
{% block assistant %}Sentiment:{% endblock %}
"""

EXAMPLE_EVALUATOR = '''\
"""Evaluators are plain functions over rows; the pipeline names them (`python: example.score`)."""


def score(rows, prediction="prediction", reference="label"):
    correct = sum(1 for r in rows if (r[prediction] or "").lower() == r[reference].lower())
    return {"accuracy": correct / len(rows) if rows else 0.0, "n": len(rows)}
'''

EXAMPLE_DATA = """\
{"text": "A warm, funny and beautifully acted film.", "label": "positive"}
{"text": "Tedious, overlong and completely forgettable.", "label": "negative"}
{"text": "One of the best thrillers of the decade.", "label": "positive"}
{"text": "The plot makes no sense and the jokes fall flat.", "label": "negative"}
"""


def init_workspace(root: Path) -> Path:
    files = {
        "pipelines/example.yaml": EXAMPLE_PIPELINE,
        "prompts/example/classify.j2": EXAMPLE_PROMPT,
        "evaluators/example.py": EXAMPLE_EVALUATOR,
        "data/example.jsonl": EXAMPLE_DATA,
        ".gitignore": "# retort's store (it holds the calls you paid for: back it up, do not commit it),\n"
                      "# and what it rebuilds: exports and reports\n.retort/\nexports/\nreports/\n",
    }
    existing = [name for name in files if (root / name).exists()]
    if existing:
        raise UserError(f"{root / existing[0]} already exists; retort init does not overwrite files")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / ".retort").mkdir(exist_ok=True)
    import json

    from retort.spec import json_schema

    (root / ".retort" / "schema.json").write_text(json.dumps(json_schema(), indent=2))
    return root.resolve()
