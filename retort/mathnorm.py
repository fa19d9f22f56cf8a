"""Math final answers: find them in a completion, normalise them, compare them.

The `answer` parser and the math evaluators share these three functions, so an
answer is parsed and scored by the same rules.

    extract_answer(text)   the final answer of a worked solution, cleaned, or None
    normalize_answer(s)    a comparison key: equal answers get equal keys
    math_equal(pred, gold) whether two answers are the same answer

The LbT pipelines default to the stricter rules of the LbT paper's own scorer,
in the last section (`lbt_extract`, `lbt_gold`, `lbt_equal`, `lbt_marked`;
`parse: {answer: {rules: lbt}}`).

Graders disagree on the details, so the choices made here are listed:

- Numbers compare exactly, as rationals: "0.5" == ".5" == "1/2" == "\\frac{1}{2}"
  == "\\dfrac12" == "0.50". No float tolerance: "0.33" != "1/3".
- A percent sign is dropped by `normalize_answer` ("50%" -> "50"), and
  `math_equal` also accepts the fractional reading when only one side has it:
  "50%" equals both "50" and "0.5" (but "50" does not equal "0.5").
- Thousands separators, dollar signs and trailing units are dropped:
  "$1,000.00" == "1000", "5 cm" == "5" == "5\\text{ cm}". A unit must be set
  apart by a space or `\\text{}`, so "3x" stays "3x".
- A leading single-variable assignment is dropped: "x = 5" == "5".
- Anything that is not a number compares as a string, case-insensitive, with
  whitespace, `$`, `\\left`/`\\right` and LaTeX spacing removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache

__all__ = ["clean_answer", "extract_answer", "lbt_equal", "lbt_extract", "lbt_gold", "lbt_marked", "lbt_normalize",
           "math_equal", "normalize_answer"]

# --- finding the final answer -------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BOXED_TOKEN = re.compile(r"[^\s$]+")  # `\boxed 5`, the brace-less form
_FINAL_MARK = re.compile(r"\[\[\s*final\s+answer\s*\]\]\s*:?", re.IGNORECASE)
_HASH_MARK = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer\s+(?:is|would\s+be|should\s+be)\b\s*:?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"\banswer\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_LAST_NUMBER = re.compile(
    r"(?<![\w.])-?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")

_TEXT_CMD = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.])([1-9]\d{0,2})((?:,\d{3})+)(?![\d,])")
_SPACES = re.compile(r"\s+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the balanced {...} opening at text[start], and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last top-level `\\boxed{...}` (nested braces kept)."""
    found = None
    pos = 0
    while (m := _BOXED.search(text, pos)) is not None:
        end = m.end()
        if end < len(text) and text[end] == "{":
            got = _braced(text, end)
            if got is None:  # unclosed: a truncated completion; keep the last closed one
                break
            found, pos = got
        elif (tok := _BOXED_TOKEN.match(text, end)) is not None:
            found, pos = tok.group(), tok.end()
        else:
            pos = end
    return found


def _last(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    last = None
    for match in matches:  # only the last one counts: solutions conclude at the end
        last = match
    return last


def _after(text: str, marker: re.Pattern[str], *, sentence: bool) -> str | None:
    """The cleaned text after the last `marker`: the rest of its line (or the next line)."""
    last = _last(marker.finditer(text))
    if last is None:
        return None
    line = text[last.end():].lstrip().partition("\n")[0]
    if sentence:  # "the answer is 42. So ..." -> "42"
        line = _SENTENCE_END.split(line, 1)[0]
    return clean_answer(line) or None


def extract_answer(text: str | None, *, fallback_last_number: bool = True) -> str | None:
    """The final answer of a worked solution, cleaned; None when there is none.

    Looks, in order, for the last `\\boxed{...}`, the last `[[Final Answer]]:`,
    the last `####`, the last "answer is ...", the last "Answer: ...", and
    finally (when `fallback_last_number`) the last number in the text.
    """
    if not text:
        return None
    answer: str | None
    if "\\boxed" in text or "\\fbox" in text:
        boxed = _last_boxed(text)
        if boxed is not None and (answer := clean_answer(boxed)):
            return answer
    if "[[" in text and (answer := _after(text, _FINAL_MARK, sentence=False)):
        return answer
    if "####" in text and (answer := _after(text, _HASH_MARK, sentence=False)):
        return answer
    if "nswer" in text or "NSWER" in text:  # cheap pre-check before two regex scans
        if answer := _after(text, _ANSWER_IS, sentence=True):
            return answer
        if answer := _after(text, _ANSWER_COLON, sentence=True):
            return answer
    if fallback_last_number:
        last = _last(_LAST_NUMBER.finditer(text))
        if last is not None:
            return clean_answer(last.group())
    return None


def clean_answer(s: str) -> str:
    """Strip the dressing around an answer: `$`, `\\text{}`, bold, a trailing period,
    thousands separators. Keeps the answer's own spelling otherwise."""
    s = s.strip()
    if "\\" in s:
        for _ in range(3):  # \text{\textbf{x}}: unwrap a few levels
            unwrapped = _TEXT_CMD.sub(r" \1", s)
            if unwrapped == s:
                break
            s = unwrapped
        s = s.replace("\\$", "").replace("\\%", "%")
        if s.startswith(("\\(", "\\[")):
            s = s[2:]
        if s.endswith(("\\)", "\\]")):
            s = s[:-2]
    s = s.replace("$", "").replace("**", "").strip(" \t`")
    s = s.rstrip(".").strip()
    if "," in s and "(" not in s and "[" not in s:  # a tuple "(1,234)" keeps its comma
        s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    return _SPACES.sub(" ", s)


# --- normalising and comparing ------------------------------------------------

_LATEX_NOISE = re.compile(
    r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)(?![a-zA-Z])|\\ |~|\^\s*\{?\\circ\}?|°")
_DFRAC = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+|[a-z])")
_ASSIGNMENT = re.compile(r"^[a-z](?:_\{?\w+\}?)?\s*=\s*(?!=)(.+)$")
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?"
_UNIT = re.compile(rf"^({_NUM}%?)\s+([a-z][a-z\s./^23]*)$")
_NUMBER = re.compile(_NUM)
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_FRAC = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_THOUSANDS_WHOLE = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d*)?%?")
_CHOICE_LETTER = re.compile(r"^\(([a-z])\)$")
_CONNECTIVES = frozenset({"and", "or", "to"})


def _fraction(s: str) -> Fraction:
    """Fraction(s) for a string that matched _NUMBER, with fast paths: parsing a
    string costs Fraction several times what building it from integers does."""
    whole, dot, decimals = s.partition(".")
    if "e" not in s and (not dot or decimals.isdigit()):
        if not dot:
            return Fraction(int(whole))
        return Fraction(int(whole + decimals), 10 ** len(decimals))  # "-.5" -> -5/10
    return Fraction(s)


def _number(s: str) -> Fraction | None:
    if _NUMBER.fullmatch(s):
        return _fraction(s)
    if (m := _SLASH.fullmatch(s)) is not None:
        divisor = _fraction(m.group(2))
        return _fraction(m.group(1)) / divisor if divisor else None
    if (m := _FRAC.fullmatch(s)) is not None:
        top, bottom = m.group(2), m.group(3)
        if _NUMBER.fullmatch(top) and _NUMBER.fullmatch(bottom) and _fraction(bottom):
            value = _fraction(top) / _fraction(bottom)
            return -value if m.group(1) == "-" else value
    return None


def _format(value: Fraction) -> str:
    """A rational as a canonical string: "42", "0.125", or "1/3" when not a finite decimal."""
    num, den = value.numerator, value.denominator
    if den == 1:
        return str(num)
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{num}/{den}"
    places = max(twos, fives)
    digits = str(abs(num) * 10**places // den).rjust(places + 1, "0")
    return f"{'-' if num < 0 else ''}{digits[:-places]}.{digits[-places:]}"


@lru_cache(maxsize=1 << 16)
def _analyse(s: str) -> tuple[str, Fraction | None, bool]:
    """(comparison key, value when numeric, whether it had a percent sign)."""
    if "\\boxed" in s or "\\fbox" in s:
        inner = _last_boxed(s)
        if inner is not None:
            s = inner
    s = clean_answer(s).replace("\u2212", "-")
    if "\\" in s or "~" in s or "°" in s or "^" in s:
        s = _LATEX_NOISE.sub(" ", s)
        s = _DFRAC.sub(r"\\frac", s)
        s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
        s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = s.strip().rstrip(".").lower()
    if s.count("=") == 1 and (m := _ASSIGNMENT.match(s)) is not None:
        s = m.group(1)
    if (m := _UNIT.match(s)) is not None and not _CONNECTIVES & set(m.group(2).split()):
        s = m.group(1)
    compact = _SPACES.sub("", s)
    if _THOUSANDS_WHOLE.fullmatch(compact):
        compact = compact.replace(",", "")
    percent = compact.endswith("%")
    value = _number(compact[:-1] if percent else compact)
    if value is not None:
        return _format(value), value, percent
    if (m := _CHOICE_LETTER.match(compact)) is not None:  # "(C)" -> "c"
        compact = m.group(1)
    return compact, None, False


def normalize_answer(s: str) -> str:
    """A comparison key for an answer (not for display): numbers in a canonical
    form ("1,000.00" -> "1000", "\\frac{1}{2}" -> "0.5", "50%" -> "50"), anything
    else lowercased with whitespace and LaTeX spacing removed. Equal keys mean
    equal answers, so the key also serves majority votes."""
    return _analyse(s)[0]


def math_equal(pred: object, gold: object) -> bool:
    """Whether `pred` and `gold` are the same final answer (see the module docstring).

    Compares answers, not completions: run `extract_answer` on a full solution first.
    A None or empty answer equals nothing.
    """
    if pred is None or gold is None:
        return False
    key_p, value_p, pct_p = _analyse(str(pred))
    key_g, value_g, pct_g = _analyse(str(gold))
    if value_p is not None and value_g is not None:
        if value_p == value_g:
            return True
        if pct_p != pct_g:  # one side wrote "%": also accept its fractional reading
            return value_p / 100 == value_g if pct_p else value_p == value_g / 100
        return False
    return bool(key_p) and key_p == key_g


# --- the LbT reference rules ----------------------------------------------------
#
# The learning-by-teaching paper scores math answers with its own extractor and
# equality (imagination-research/lbt, lbt/datasets_adapter/math_dataset.py:
# `MathExamScorer.post_process`, `_normalize_final_answer`, and the opencompass
# `MATHEvaluator.is_equiv` / `_strip_string` it copies). The LbT pipelines use
# these rules by default so that a run reports what the paper would. They are
# far stricter than the functions above: "18.00" != "18", "1/2" != "2/4",
# "50%" != "50", "7 days" != "7", "(B)" != "B"; and "5,6" == "56".
# This is an independent implementation of the same rules, step for step.

_LBT_MARKED = re.compile(r"\[\[Final Answer\]\]:\n([^\n]+)\n")
# Text removed or replaced before anything else, in this order (order matters:
# "an " goes before " ", ".$" before "$").
_LBT_REPLACE = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_LBT_UNITS = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
              "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
              "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
              "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ",
              "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots", "\n", "\r", "\f")
_LBT_LE = re.compile(r"\\le(?!ft)")  # "\le" -> "<" but not "\left"
_LBT_FT = re.compile(r"(?<!le)ft")  # the unit "ft", but not the "ft" of "\left"
_LBT_UNWRAP = (re.compile(r"\\text\{(.*?)\}"), re.compile(r"\\textbf\{(.*?)\}"),
               re.compile(r"\\overline\{(.*?)\}"), re.compile(r"\\boxed\{(.*)\}"))
_LBT_FRAC = re.compile(r"frac([^{])(.)")
_LBT_SQRT_BARE = re.compile(r"(?<!\\)sqrt")
_LBT_SQRT_PAREN = re.compile(r"sqrt\(([^)]+)\)")
_LBT_SQRT_SHORT = re.compile(r"sqrt([^{])")


def lbt_normalize(answer: str) -> str:
    """The reference's `_normalize_final_answer`: the spelling an LbT answer is grouped and stored by."""
    s = _LBT_FT.sub("", _LBT_LE.sub("<", answer))
    for old, new in _LBT_REPLACE:
        s = s.replace(old, new)
    for unit in _LBT_UNITS:
        s = s.replace(unit, "")
    for wrapper in _LBT_UNWRAP:
        s = wrapper.sub(r"\1", s)
    s = _LBT_FRAC.sub(r"frac{\1}{\2}", s)
    s = _LBT_SQRT_BARE.sub(r"\\sqrt", s)
    s = _LBT_SQRT_PAREN.sub(r"sqrt{\1}", s)
    s = _LBT_SQRT_SHORT.sub(r"sqrt{\1}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():  # "100,000" -> "100000"; also "5,6" -> "56", as the reference does
        s = s.replace(",", "")
    return s


def lbt_marked(text: str | None) -> bool:
    """Whether `text` has a "[[Final Answer]]:" line followed by the answer on its own (ended) line."""
    return bool(text) and _LBT_MARKED.search(text or "") is not None


def lbt_extract(text: str | None) -> str:
    """The reference's `post_process`: the line after the FIRST "[[Final Answer]]:" line (the answer
    line must end with a newline), else the last line of the text; then `lbt_normalize`.

    There is always an answer (possibly ""): the reference has no "no answer" case."""
    text = text or ""
    m = _LBT_MARKED.search(text)
    line = m.group(1) if m is not None else text.strip().split("\n")[-1]
    return lbt_normalize(line)


def lbt_gold(gold: object) -> str:
    """A gold answer as the reference reads it: it wraps the gold as "[[Final Answer]]:\\n$<gold>$\\n"
    and extracts it like a student's answer (search_rationale.py builds exactly that string)."""
    return lbt_extract(f"[[Final Answer]]:\n${gold}$\n")


class _Unparsed(Exception):
    """A step of `_strip` failed where the reference's raised; `lbt_equal` then compares raw strings."""


def _lbt_fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; a short tail leaves `s` unchanged."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if not part:
            raise _Unparsed(s)  # the reference indexes part[0]
        if part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _lbt_fix_slash(s: str) -> str:
    """"3/4" -> "\\frac{3}{4}" when both sides are integers written plainly."""
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    try:
        a, b = int(pieces[0]), int(pieces[1])
    except ValueError:
        raise _Unparsed(s) from None  # the reference catches only the plain-spelling check
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _lbt_fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    head, *parts = s.split("\\sqrt")
    out = head
    for part in parts:
        if not part:
            raise _Unparsed(s)
        out += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return out


def _lbt_strip(s: str) -> str:
    """The opencompass / Hendrycks `_strip_string` rules, in their order."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\(", ""), ("\\)", ""), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
                     ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # a unit on the right
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _Unparsed(s)
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = _lbt_fix_sqrt(s).replace(" ", "")
    s = _lbt_fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _lbt_fix_slash(s)


def lbt_equal(pred: object, gold: object) -> bool:
    """The reference's `is_equiv` on two extracted answers: equal after `_strip_string`, or, when that
    fails on either side, equal as raw strings. Two Nones are equal (as in the reference); one None is not."""
    if pred is None or gold is None:
        return pred is None and gold is None
    a, b = str(pred), str(gold)
    try:
        return _lbt_strip(a) == _lbt_strip(b)
    except (_Unparsed, IndexError):
        return a == b
