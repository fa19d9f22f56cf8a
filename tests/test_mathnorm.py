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
