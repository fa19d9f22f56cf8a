"""Bridge (pipelines/bridge.yaml) against the reference, rosewang2008/bridge.

The reference's rules are written out here by hand, independently of the pipeline's
params and templates: the label sets and their wording (scripts/constants.py), the
numbered lists and answer formats of the (A) and (B) prompts (prompts/task1_infer_error,
prompts/task2_strategy), the response prompt's decision sentences and its cue
(prompts/task3_generate_response, as the reference's outputs/responses/*.json record
them), the labels its random condition draws (outputs/responses/random_*.json: never
`other`), and judging whole replies against whole expert responses.

The scripted tutor replies with the decision sentences it was given, then a second
sentence; the scripted model answers (A) with option 2 and (B) with options 2 and 3.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import ROOT, SHARED, run_cli
from conftest import db_rows as _sql

# scripts/constants.py: label -> the wording the response prompt uses, in the reference's order.
ERRORS = {
    "guess": "Student does not seem to understand or guessed the answer.",
    "misinterpret": "Student misinterpreted the question.",
    "careless": "Student made a careless mistake.",
    "right-idea": "Student has the right idea, but is not quite there.",
    "imprecise": "Student's answer is not precise enough or the tutor is being too picky about the form of the "
                 "student's answer.",
    "diagnose": "You are not sure why the student made a mistake but you are going to try to diagnose the student.",
    "other": "None of the above, but I have a different description. (please specify in the textbox)",
}
STRATEGIES = {
    "explain_concept": "Explain a concept", "ask_question": "Ask a question", "provide_hint": "Provide a hint",
    "provide_strategy": "Provide a strategy", "provide_example": "Provide a worked example",
    "provide_correction": "Provide a minor correction", "provide_similar_problem": "Provide a similar problem",
    "simplify_question": "Simplify the question", "affirm_correct_answer": "Affirm the correct answer",
    "encourage_student": "Encourage the student", "other": "Other (please specify in textbox)",
}
INTENTIONS = {
    "motivate_student": "Motivate the student",
    "elaborate_answer": "Get the student to elaborate their answer",
    "correct_mistake": "Correct the student's mistake",
    "hint_mistake": "Hint at the student's mistake",
    "clarify_misunderstanding": "Clarify the student's misunderstanding",
    "understand_topic": "Help the student understand the lesson topic or solution strategy",
    "diagnose_mistake": "Diagnose the student's mistake",
    "support_thinking": "Support the student in their thinking or problem-solving",
    "explain_mistake": "Explain the student's mistake (eg. what is wrong in their answer or why is it incorrect)",
    "signal_goal": "Signal to the student that they have solved or not solved the problem",
    "other": "Other (please specify in textbox)",
}
# prompts/task1_infer_error: the numbered error list (note: 5 is `other`, 6 is `diagnose`).
ERROR_LIST = """Error list:
0. Student does not seem to understand or guessed the answer.
1. Student misinterpreted the question.
2. Student made a careless mistake.
3. Student has the right idea, but is not quite there.
4. Student's answer is not precise enough or the tutor is being too picky about the form of the student's answer.
5. None of the above, but I have a different description (please specify in your reasoning).
6. Not sure, but I'm going to try to diagnose the student.
"""
ERROR_NUMBERS = ["guess", "misinterpret", "careless", "right-idea", "imprecise", "other", "diagnose"]
ERROR_FORMAT = 'Format your answer as: [{"answer": #, "reason": "write out your reason for picking # here"}]'
# prompts/task2_strategy: the two numbered lists (10 is `other` in both).
STRATEGY_LISTS = """Strategies:
0. Explain a concept
1. Ask a question
2. Provide a hint
3. Provide a strategy
4. Provide a worked example
5. Provide a minor correction
6. Provide a similar problem
7. Simplify the question
8. Affirm the correct answer
9. Encourage the student
10. Other (please specify in your reasoning)

Intentions:
0. Motivate the student
1. Get the student to elaborate their answer
2. Correct the student's mistake
3. Hint at the student's mistake
4. Clarify a student's misunderstanding
5. Help the student understand the lesson topic or solution strategy
6. Diagnose the student's mistake
7. Support the student in their thinking or problem-solving
8. Explain the student's mistake (eg. what is wrong in their answer or why is it incorrect)
9. Signal to the student that they have solved or not solved the problem
10. Other (please specify in your reasoning)
"""
STRATEGY_FORMAT = ('Format your answer as: [{"strategy": #, "intention": #, '
                   '"reason": "write out your reason for picking that strategy and intention"}]')
CUE = "tutor (maximum one sentence):"

SCRIPT = '''
import re


def _text(request):
    return "\\n".join(m["content"] for m in request.messages)


def _reply(text):
    if "Error list:" in text:
        return '[{"answer": 2, "reason": "a slip"}]'
    if "Strategies:" in text:
        return 'Here: [{"strategy": 2, "intention": "3", "reason": "nudge"}]'
    if text.rstrip().endswith("tutor (maximum one sentence):"):
        said = re.search(r"is on topic: .*?\\. (.*)\\n", text).group(1).strip()
        return 'tutor: "Decisions [' + said + '] Second sentence."'
    raise AssertionError(text)


def always_a(request):
    text = _text(request)
    return "A" if "Response A:" in text else _reply(text)


def prefers_hint(request):
    """Prefers whichever response used provide_hint (the model condition's strategy here)."""
    text = _text(request)
    if "Response A:" not in text:
        return _reply(text)
    a = re.search(r"Response A: (.*)", text).group(1)
    b = re.search(r"Response B: (.*)", text).group(1)
    if ("a hint" in a) == ("a hint" in b):
        return "It is a tie."
    return "A" if "a hint" in a else "Response B is better."
'''

SPEC = yaml.safe_load((ROOT / "pipelines" / "bridge.yaml").read_text())
SAMPLE = json.loads((ROOT / "data" / "bridge_sample.json").read_text())


@pytest.fixture
def ws(workspace: Path) -> Path:
    (workspace / "evaluators" / "bridgefake.py").write_text(SCRIPT)
    return workspace


def _run(ws: Path, judge: str = "always_a", *extra: str) -> dict[str, Any]:
    proc = run_cli("run", "bridge", "--model", f"*=scripted:bridgefake:{judge}", *extra, "--json", "-q", cwd=ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _decision_sentences(e: str | None, what: str | None, why: str | None) -> str:
    """The reference's `{e}{z}`: the error's wording and a space, then "In your response, <strategy> to
    <intention>."; a label from the sets in its constants.py wording, lower-cased inside the sentence,
    a free-text label verbatim."""
    if e is None:
        return ""
    z_what = _lower_first(STRATEGIES[what]) if what in STRATEGIES else what
    z_why = _lower_first(INTENTIONS[why]) if why in INTENTIONS else why
    return f"{ERRORS.get(e, e)} In your response, {z_what} to {z_why}."


def _random(item_id: str, seed: int, kind: str, labels: list[str]) -> str:
    digest = hashlib.md5(f"{item_id}:{seed}:{kind}".encode()).hexdigest()
    return labels[int(digest[:8], 16) % len(labels)]


NOT_OTHER = ([e for e in ERROR_NUMBERS if e != "other"], [s for s in STRATEGIES if s != "other"],
             [i for i in INTENTIONS if i != "other"])


def _expected(seed: int = 0) -> dict[tuple[str, str], tuple[str | None, str | None, str | None]]:
    out: dict[tuple[str, str], tuple[str | None, str | None, str | None]] = {}
    for i, conv in enumerate(SAMPLE):
        item, cid = str(i), conv["c_id"]
        out[(item, "none")] = (None, None, None)
        out[(item, "expert")] = (conv["e"], conv["z_what"], conv["z_why"])
        kinds = zip(("error", "strategy", "intention"), NOT_OTHER, strict=True)
        out[(item, "random")] = tuple(_random(cid, seed, k, labels) for k, labels in kinds)  # type: ignore[assignment]
        out[(item, "model")] = ("careless", "provide_hint", "hint_mistake")
    return out


def _reply_for(decisions: tuple[str | None, str | None, str | None]) -> str:
    return f"Decisions [{_decision_sentences(*decisions)}] Second sentence."


def test_the_label_sets_and_their_wording_are_the_references() -> None:
    params = SPEC["params"]
    assert params["errors"] == ERROR_NUMBERS
    assert params["strategies"] == list(STRATEGIES) and params["intentions"] == list(INTENTIONS)
    assert params["describe"] == {"error": ERRORS, "strategy": STRATEGIES, "intention": INTENTIONS}
    assert params["first_sentence"] is False and params["random_other"] is False


def test_each_condition_feeds_the_references_decision_sentences_into_the_response(ws: Path) -> None:
    _run(ws)
    got = dict(((item, cond), resp) for item, cond, resp in
               _sql(ws, "SELECT item, condition, response FROM main.respond WHERE _error IS NULL"))
    assert got == {key: _reply_for(d) for key, d in _expected().items()}  # whole replies, quotes and echo dropped
    # free-text expert labels keep the expert's words, verbatim (a final "." doubled, as the reference's was)
    assert got[("12", "expert")] == ("Decisions [The student did not make a mistake. In your response, Said goodbye "
                                     "to the student to The student has to go..] Second sentence.")
    assert _sql(ws, "SELECT expert_error FROM main.items WHERE item = '12'") == [("The student did not make a "
                                                                                  "mistake.",)]
    # the whole response prompt, as the reference's task3 prompt lays it out
    conv = SAMPLE[0]
    c_h = "\n".join(f"{t['user']}: {t['text']}" for t in conv["c_h"])
    requests = [json.loads(r) for (r,) in _sql(ws, "SELECT request FROM calls WHERE stage = 'respond'")]
    prompts = {m["content"] for r in requests for m in r["messages"]}
    for cond in ("none", "expert"):
        decisions = _decision_sentences(*_expected()[("0", cond)])
        assert (f"You are an experienced elementary math teacher and you are going to respond to a student's mistake "
                f"in a useful and caring way. \n\nThe problem your student is solving is on topic: "
                f"{conv['lesson_topic']}. {decisions}\n{c_h}\n{CUE}") in prompts
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in requests)


def test_steps_a_and_b_use_the_references_numbered_lists_and_b_is_not_told_the_error(ws: Path) -> None:
    _run(ws)
    a = [m["content"] for (r,) in _sql(ws, "SELECT request FROM calls WHERE stage = 'error_type'")
         for m in json.loads(r)["messages"]]
    b = [m["content"] for (r,) in _sql(ws, "SELECT request FROM calls WHERE stage = 'decisions'")
         for m in json.loads(r)["messages"]]
    assert len(a) == len(b) == len(SAMPLE)
    for prompt in a:
        assert ERROR_LIST in prompt and prompt.rstrip().endswith(ERROR_FORMAT)
    for prompt in b:
        assert STRATEGY_LISTS in prompt and prompt.rstrip().endswith(STRATEGY_FORMAT)
        assert not any(text in prompt for text in ERRORS.values())  # (B) never sees (A)'s error type
        assert "careless" not in prompt and "error type" not in prompt.lower()
    # option numbers map back to labels: (A) 2 = careless, (B) 2 = provide_hint, "3" = hint_mistake
    assert _sql(ws, "SELECT DISTINCT error_number, error_reason FROM main.error_type") == [(2, "a slip")]
    assert _sql(ws, "SELECT DISTINCT error, strategy, intention FROM main.conditions WHERE condition = 'model'") == [
        ("careless", "provide_hint", "hint_mistake")]


def test_random_decisions_never_draw_other_and_cover_the_rest(ws: Path) -> None:
    # 240 conversations written here, so every label the reference's random condition uses turns up
    many = [{"c_id": f"c{i}", "lesson_topic": "t", "c_h": [{"user": "student", "text": "5"}],
             "c_r_": [{"user": "tutor", "text": "Check."}], "e": "guess", "z_what": "ask_question",
             "z_why": "signal_goal"} for i in range(240)]
    (ws / "data" / "many.json").write_text(json.dumps(many))
    one = ["--set", "params.conditions=[random]", "--set", "params.compare=[]", "--set", "params.against_reference=[]"]
    _run(ws, "always_a", "--input", "data/many.json", *one)
    drawn = _sql(ws, "SELECT list(DISTINCT random_error), list(DISTINCT random_strategy), "
                     "list(DISTINCT random_intention) FROM main.items")[0]
    assert [sorted(d) for d in drawn] == [sorted(labels) for labels in NOT_OTHER]
    rows = _sql(ws, "SELECT item_id, random_error, random_strategy, random_intention FROM main.items")
    assert all(r[1:] == tuple(_random(r[0], 0, k, labels) for k, labels in
                              zip(("error", "strategy", "intention"), NOT_OTHER, strict=True)) for r in rows)
    # the opt-in old behaviour draws `other` too
    _run(ws, "always_a", "--input", "data/many.json", *one, "--set", "params.random_other=true")
    assert _sql(ws, "SELECT count(*) > 0 FROM main.items WHERE 'other' IN (random_error, random_strategy, "
                    "random_intention)") == [(True,)]


def test_random_decisions_are_seeded_and_stable_across_runs(ws: Path, tmp_path_factory: pytest.TempPathFactory
                                                            ) -> None:
    query = "SELECT item_id, random_error, random_strategy, random_intention FROM main.items ORDER BY item_id"
    _run(ws)
    first = _sql(ws, query)
    other = tmp_path_factory.mktemp("again")
    for folder in ("pipelines", "prompts", "evaluators", "data"):
        (other / folder).mkdir()
    (other / "evaluators" / "bridgefake.py").write_text(SCRIPT)
    _run(other)
    assert _sql(other, query) == first  # a fresh database, the same decisions
    _run(other, "always_a", "--set", "params.seed=1")
    assert _sql(other, query) != first
    reseeded = {k: _reply_for(d) for k, d in _expected(seed=1).items() if k[1] == "random"}
    got = {(item, "random"): resp for item, resp in
           _sql(other, "SELECT item, response FROM main.respond WHERE condition = 'random'")}
    assert got == reseeded


def test_the_judge_compares_whole_replies_with_whole_expert_responses(ws: Path) -> None:
    _run(ws)
    multi = [i for i, c in enumerate(SAMPLE) if len(c["c_r_"]) > 1 or c["c_r_"][0]["text"].count(". ") > 0]
    assert multi  # the sample has expert responses of more than one sentence
    shown = {(item, a, b): (ra, rb) for item, a, b, ra, rb in _sql(
        ws, "SELECT item, cond_a, cond_b, response_a, response_b FROM main.pairs WHERE NOT swapped")}
    for i, conv in enumerate(SAMPLE):
        expert = " ".join(t["text"] for t in conv["c_r_"])
        assert shown[(str(i), "model", "reference")] == (_reply_for(_expected()[(str(i), "model")]), expert)
        assert shown[(str(i), "model", "none")][1] == _reply_for((None, None, None))


def test_first_sentence_cuts_both_sides_alike(ws: Path) -> None:
    _run(ws, "always_a", "--set", "params.first_sentence=true")
    first = _module().first_sentence
    shown = {(item, a, b): (ra, rb) for item, a, b, ra, rb in _sql(
        ws, "SELECT item, cond_a, cond_b, response_a, response_b FROM main.pairs WHERE NOT swapped")}
    for i, conv in enumerate(SAMPLE):
        expert = " ".join(t["text"] for t in conv["c_r_"])
        ra, rb = shown[(str(i), "model", "reference")]
        assert rb == first(expert) and ra == first(_reply_for(_expected()[(str(i), "model")]))
    assert shown[("11", "model", "reference")][1] == "You are working hard, and that's great!"  # its second turn cut
    # (C) itself is unchanged: the cut happens where the judge reads
    assert _sql(ws, "SELECT count(*) FROM main.respond WHERE response LIKE '%Second sentence.'") == [
        (4 * len(SAMPLE),)]


def test_an_always_a_judge_splits_evenly_after_the_swap(ws: Path) -> None:
    _run(ws)
    n = len(SAMPLE)
    rows = _sql(ws, "SELECT comparison, n, items, wins, losses, ties, win_rate, tie_rate, ci_low, ci_high, "
                    "consistency, a_rate FROM main.win_rates__comparisons ORDER BY comparison")
    assert rows == [(c, 2 * n, n, n, n, 0, 0.5, 0.0, 0.5, 0.5, 0.0, 1.0)
                    for c in ("model vs none", "model vs reference", "none vs reference")]
    assert _sql(ws, "SELECT swapped, cond_a, winner, outcome, count(*) FROM main.judgments "
                    "WHERE comparison = 'model vs none' GROUP BY ALL ORDER BY swapped") == [
        (False, "model", "model", "a", n), (True, "none", "none", "b", n)]
    recorded = dict(_sql(ws, "SELECT name, value FROM main.metrics WHERE stage = 'win_rates'"))
    assert recorded["model_vs_none_win_rate"] == 0.5


def test_a_judge_preferring_one_condition_gives_it_every_win(ws: Path) -> None:
    _run(ws, "prefers_hint")
    rows = {r[0]: r[1:] for r in _sql(ws, "SELECT comparison, win_rate, tie_rate, ci_low, ci_high, consistency "
                                          "FROM main.win_rates__comparisons")}
    assert rows["model vs none"] == (1.0, 0.0, 1.0, 1.0, 1.0)
    assert rows["none vs reference"] == (0.5, 1.0, 0.5, 0.5, 1.0)
    assert _sql(ws, "SELECT DISTINCT winner FROM main.judgments WHERE comparison = 'model vs none'") == [("model",)]


def test_conditions_and_comparisons_are_params(ws: Path) -> None:
    _run(ws, "always_a", "--set", "params.conditions=[none, expert, random]",
         "--set", "params.compare=[expert, random]", "--set", "params.against_reference=[]")
    assert _sql(ws, "SELECT count(*) FROM main.error_type") == [(0,)]  # no model condition: (A) and (B) idle
    assert _sql(ws, "SELECT count(*) FROM main.decisions") == [(0,)]
    assert _sql(ws, "SELECT DISTINCT condition FROM main.conditions ORDER BY 1") == [("expert",), ("none",),
                                                                                      ("random",)]
    assert _sql(ws, "SELECT DISTINCT comparison FROM main.judgments") == [("expert vs random",)]
    assert _sql(ws, "SELECT count(*) FROM main.judge") == [(2 * len(SAMPLE),)]


def test_an_option_number_outside_the_list_gives_no_model_row(ws: Path) -> None:
    (ws / "evaluators" / "bridgefake.py").write_text(SCRIPT.replace('"answer": 2', '"answer": 9'))
    _run(ws)
    assert _sql(ws, "SELECT count(*) FROM main.error_type WHERE _error IS NULL AND error_number = 9") == [
        (len(SAMPLE),)]
    assert _sql(ws, "SELECT count(*) FROM main.conditions WHERE condition = 'model'") == [(0,)]


def test_rerun_makes_no_calls(ws: Path) -> None:
    assert _run(ws)["calls_made"] > 0
    assert _run(ws)["calls_made"] == 0


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retort_test_bridge", ROOT / "evaluators" / "bridge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_parsers() -> None:
    bridge = _module()
    from retort.errors import ParseError

    first = bridge.first_sentence
    assert first("Tutor: Close! A hexagon has 6 sides.") == "Close!"
    assert first('"What is 3.5 times 2?" she asks. More.') == "What is 3.5 times 2?"
    assert first("**Tutor:** Try 1/2. Then 1/3.") == "Try 1/2."
    with pytest.raises(ParseError):
        first("  \n ...")
    reply = bridge.tutor_reply
    assert reply('tutor (maximum one sentence): "Close! A hexagon has 6 sides."') == "Close! A hexagon has 6 sides."
    assert reply("Try 1/2. Then 1/3.\nGood luck.") == "Try 1/2. Then 1/3.\nGood luck."
    with pytest.raises(ParseError):
        reply("tutor: ...")
    assert bridge.error_answer('[{"answer": 6, "reason": "unsure"}]') == {"error_number": 6, "error_reason": "unsure"}
    assert bridge.decision_answer('{"strategy": 0, "intention": 10}') == {
        "strategy_number": 0, "intention_number": 10, "decision_reason": None}
    with pytest.raises(ParseError):
        bridge.error_answer('[{"answer": "guess"}]')
    with pytest.raises(ParseError):
        bridge.decision_answer("I would ask a question.")


@pytest.mark.skipif(not (SHARED / "bridge" / "test.json").exists(), reason="../shared/datasets is absent")
def test_the_real_bridge_file_loads_with_just_input(ws: Path) -> None:
    path = SHARED / "bridge" / "test.json"
    _run(ws, "always_a", "--input", str(path), "--limit", "2")
    real = json.loads(path.read_text())[:2]
    items = _sql(ws, "SELECT item_id, topic, conversation, expert_response, expert_error FROM main.items ORDER BY item")
    assert [r[0] for r in items] == [c["c_id"] for c in real]
    for (_, topic, conversation, expert, error), conv in zip(items, real, strict=True):
        assert topic == conv["lesson_topic"]
        assert conversation == "\n".join(f"{t['user']}: {t['text']}" for t in conv["c_h"])
        assert expert == " ".join(t["text"] for t in conv["c_r_"])
        assert error == conv["e"]
    assert _sql(ws, "SELECT count(*) FROM main.respond") == [(8,)]
    assert _sql(ws, "SELECT count(*) FROM main.judgments") == [(2 * 2 * 3,)]


@pytest.mark.local_model
def test_end_to_end_on_the_embedded_model(workspace: Path) -> None:
    begun = time.monotonic()
    proc = run_cli("run", "bridge", "--limit", "2", "--set", "params.conditions=[none, expert, model]",
                   "--set", "params.compare=[expert, none]", "--set", "params.against_reference=[]",
                   "--json", "-q", cwd=workspace)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads(proc.stdout)["status"] == "ok"
    assert _sql(workspace, "SELECT count(*) FROM main.items") == [(2,)]
    assert _sql(workspace, "SELECT count(*) FROM main.error_type") == [(2,)]
    assert _sql(workspace, "SELECT count(*) FROM main.decisions") == [(2,)]
    ((judged,),) = _sql(workspace, "SELECT count(*) FROM main.judge")
    assert judged == 4  # expert vs none, 2 items x 2 orders
    print(f"bridge on the embedded model: {time.monotonic() - begun:.1f}s")

