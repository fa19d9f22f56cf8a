from __future__ import annotations

import pytest

from retort.mathnorm import clean_answer, extract_answer, math_equal, normalize_answer

# --- extract_answer -------------------------------------------------------------


def test_boxed_with_nested_braces_keeps_the_whole_group() -> None:
    text = r"Thus $x = \boxed{\frac{\sqrt{3}}{2}}$ is the value."
    assert extract_answer(text) == r"\frac{\sqrt{3}}{2}"


def test_last_boxed_wins_and_a_nested_boxed_is_not_a_separate_answer() -> None:
    assert extract_answer(r"first \boxed{1}, then \boxed{2}.") == "2"
    assert extract_answer(r"\boxed{\boxed{7} + 1} then nothing") == r"\boxed{7} + 1"


def test_unclosed_boxed_from_a_truncated_completion_falls_back_to_the_last_closed_one() -> None:
    assert extract_answer(r"try \boxed{3} ... final \boxed{\frac{1}{") == "3"


def test_boxed_without_braces() -> None:
    assert extract_answer(r"so the result is $\boxed 5$.") == "5"


def test_priority_boxed_over_markers() -> None:
    text = "#### 4\nThe answer is 5.\n" + r"\boxed{6}"
    assert extract_answer(text) == "6"


def test_final_answer_marker_over_hash_and_phrases() -> None:
    text = "The answer is 3.\n#### 4\n[[Final Answer]]: $12$."
    assert extract_answer(text) == "12"


def test_hash_marker_gsm8k_style_strips_thousands_separators() -> None:
    assert extract_answer("She earns 1,200 + 34 = 1,234 dollars.\n#### 1,234") == "1234"


def test_answer_is_phrase_stops_at_the_sentence_end_but_not_at_a_decimal_point() -> None:
    assert extract_answer("So the final answer is 3.5. We are done.") == "3.5"
    assert extract_answer("The answer is: **42**.\nCheck: 40 + 2 = 42") == "42"
    assert extract_answer("Hence the answer is $(1, 2)$. Done") == "(1, 2)"


def test_answer_colon_takes_the_next_line_when_the_marker_ends_its_line() -> None:
    assert extract_answer("Work...\nAnswer:\n  $\\frac{2}{3}$\n") == r"\frac{2}{3}"


def test_last_number_fallback_and_its_switch() -> None:
    text = "We have 3 apples and then 4.5 kilograms, -2 left."
    assert extract_answer(text) == "-2"
    assert extract_answer(text, fallback_last_number=False) is None
    assert extract_answer("no numbers here") is None
    assert extract_answer("") is None


def test_clean_answer_strips_dressing() -> None:
    assert clean_answer(r" \$1,000.00. ") == "1000.00"
    assert clean_answer(r"\text{Monday}") == "Monday"
    assert clean_answer(r"5\text{ cm}") == "5 cm"
    assert clean_answer("(1,234)") == "(1,234)"  # a tuple keeps its comma
    assert clean_answer(r"50\%") == "50%"


# --- normalize_answer / math_equal ----------------------------------------------

@pytest.mark.parametrize("a", ["1/2", "0.5", ".5", "0.50", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\tfrac12",
                               r"\boxed{\frac12}", "$0.5$"])
def test_one_half_in_every_spelling(a: str) -> None:
    assert math_equal(a, "1/2")
    assert normalize_answer(a) == "0.5"


def test_money_units_and_separators() -> None:
    assert math_equal("$1,000.00", "1000")
    assert math_equal(r"\$1,000", "1000.0")
    assert math_equal("5 cm", "5")
    assert math_equal(r"5\text{ cm}", "5")
    assert math_equal(r"30^\circ", "30")
    assert not math_equal("3x", "3")  # a unit needs a space: "3x" is an expression


def test_assignment_is_reduced_to_its_value() -> None:
    assert math_equal("x = 5", "5")
    assert math_equal("5", "y=5")
    assert not math_equal("x = 5", "6")


def test_percent_decision() -> None:
    # Documented choice: "50%" equals 50 and 0.5; plain 50 does not equal 0.5.
    assert math_equal("50%", "50")
    assert math_equal(r"50\%", "0.5")
    assert math_equal("0.5", "50%")
    assert not math_equal("50", "0.5")
    assert math_equal("50%", "50%")
    assert normalize_answer("50%") == "50"


def test_no_float_tolerance() -> None:
    assert not math_equal("0.33", "1/3")
    assert math_equal(r"\frac{2}{6}", "1/3")
    assert normalize_answer("1/3") == "1/3"


def test_negative_fractions_and_unicode_minus() -> None:
    assert math_equal(r"-\frac{3}{4}", "-0.75")
    assert math_equal(r"\frac{-3}{4}", "\u22120.75")
    assert not math_equal(r"\frac{3}{4}", "-0.75")


def test_strings_compare_case_and_space_insensitively() -> None:
    assert math_equal(r"\text{Monday}", "monday")
    assert math_equal("(1, 2)", "(1,2)")
    assert math_equal(r"\left( 1, 2 \right)", "(1,2)")
    assert math_equal(r"\text{(C)}", "C")
    assert math_equal(r"\sqrt2", r"\sqrt{2}")
    assert not math_equal("(1,2)", "(2,1)")


def test_none_and_empty_never_equal() -> None:
    assert not math_equal(None, "1")
    assert not math_equal("1", None)
    assert not math_equal("", "")


def test_non_string_inputs() -> None:
    assert math_equal(1000, "1,000")
    assert math_equal(0.5, "1/2")


def test_division_by_zero_is_not_a_number() -> None:
    assert normalize_answer("1/0") == "1/0"
    assert not math_equal("1/0", "2/0")


def test_normalize_canonical_forms() -> None:
    assert normalize_answer("1,000,000") == "1000000"
    assert normalize_answer("-0.0") == "0"
    assert normalize_answer("2e3") == "2000"
    assert normalize_answer("0.125") == "0.125"
    assert normalize_answer(r"\frac{7}{8}") == "0.875"


# --- the LbT reference's rules (lbt_extract, lbt_gold, lbt_equal) ---------------------------------
#
# Expected values worked out by hand from imagination-research/lbt,
# lbt/datasets_adapter/math_dataset.py: `post_process` (the line after the first
# "[[Final Answer]]:\n", which must itself end in "\n", else the last line),
# `_normalize_final_answer` (drops spaces, "$", listed units, \text{} and \boxed{} wrappers;
# "5,6" -> "56" because the comma-less text is all digits) and `is_equiv` (equal after the
# opencompass `_strip_string`, or raw equality when that raises). The gold is wrapped as
# "[[Final Answer]]:\n$<gold>$\n" first, as scripts/math/search_rationale.py does.

from retort.mathnorm import lbt_equal, lbt_extract, lbt_gold, lbt_marked  # noqa: E402

# (student's answer line, gold, the reference's verdict, retort's lenient verdict)
LBT_PAIRS = [
    ("18.00", "18", False, True),           # no numeric reading: strings differ
    ("1/2", "2/4", False, True),            # \frac{1}{2} vs \frac{2}{4}
    ("50%", "50", False, True),             # only "\%" is removed, not "%"
    ("5\\%", "5", True, True),
    ("7 days", "7", False, True),           # "days" is not in the reference's unit list
    ("3 feet", "3", True, True),            # "feet" is
    ("5 cm", "5", True, True),
    ("12 dollars", "12", True, True),
    ("10 apples", "10", False, True),
    ("(B)", "B", False, True),
    ("\\text{(B)}", "(B)", True, True),     # \text{} is unwrapped
    ("5,6", "56", True, False),             # the comma goes: both read 56
    ("1,000", "1000", True, True),
    ("0.5", "1/2", True, True),             # "0.5" is special-cased to \frac{1}{2}
    (".5", "1/2", True, True),              # a leading "." gets its 0 first
    ("0.25", "1/4", False, True),           # only 0.5 is special-cased
    ("\\frac12", "1/2", True, True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True, True),
    ("-2/3", "-\\frac{2}{3}", False, True),  # "-2/3" becomes \frac{-2}{3}
    ("x=5", "5", True, True),               # a short left side of "=" is dropped
    ("\\boxed{16}", "16", True, True),
    ("16.", "16", False, True),             # a trailing "." stays unless "$16.$" (".$" -> "$")
    ("$16.$", "16", True, True),
    ("90^\\circ", "90", True, True),
    ("\\left(1,2\\right)", "(1,2)", True, True),
    ("1/x", "1/x", True, True),             # int("x") raises: raw strings compare
    ("X", "x", False, True),                # case matters
]


@pytest.mark.parametrize(("line", "gold", "reference", "lenient"), LBT_PAIRS)
def test_lbt_reference_equality_on_tricky_pairs(line: str, gold: str, reference: bool, lenient: bool) -> None:
    answer = lbt_extract(f"Some work.\n\n[[Final Answer]]:\n{line}\n")
    assert lbt_equal(answer, lbt_gold(gold)) is reference
    assert math_equal(line, gold) is lenient


def test_lbt_reference_disagrees_with_the_lenient_rules_on_these_pairs() -> None:
    assert sum(ref != len_ for _, _, ref, len_ in LBT_PAIRS) == 11


@pytest.mark.parametrize(("text", "answer"), [
    ("Work.\n\n[[Final Answer]]:\n$16$\n", "16"),
    ("[[Final Answer]]:\n3\n\nOn second thought\n[[Final Answer]]:\n4\n", "3"),  # the FIRST marker
    ("Work.\n[[Final Answer]]: 16", "[[FinalAnswer]]:16"),  # same line: no match, the last line as is
    ("Work.\n\n[[Final Answer]]:\n$16$", "16"),              # no newline after it: the last line, same answer
    ("skill 4. I am not sure how to finish.", "skill4.Iamnotsurehowtofinish."),  # truncated: its last line
    ("\\boxed{5}\n[[Final Answer]]:\n$6$\n", "6"),           # the marker, not the boxed answer
    ("So the answer is \\boxed{7}.", "Sotheansweris7."),     # boxed unwrapped inside the last line
    ("", ""),
])
def test_lbt_reference_extraction(text: str, answer: str) -> None:
    assert lbt_extract(text) == answer


def test_lbt_marker_needs_the_answer_on_its_own_ended_line() -> None:
    assert lbt_marked("x\n[[Final Answer]]:\n$3$\n")
    assert not lbt_marked("x\n[[Final Answer]]:\n$3$")
    assert not lbt_marked("x\n[[Final Answer]]: 3\n")
    assert not lbt_marked(None)


def test_lbt_equal_none_and_a_failed_strip() -> None:
    assert lbt_equal(None, None) and not lbt_equal(None, "1") and not lbt_equal("1", None)
    assert not lbt_equal("\\sqrt", "\\sqrt{}")  # _fix_sqrt raises on a bare \sqrt: raw strings differ
    assert lbt_equal("\\frac", "\\frac")  # _fix_fracs raises on an empty tail: raw strings are equal
