"""Math answer verification: answer extraction, a fast exact path for plain numbers, math-verify for the rest.

    math_reward({"answer": "#### 1234"}, "... \\boxed{1,234}")   -> (1.0, True)    fast path
    math_reward({"answer": "1/2"}, "so \\boxed{\\frac{1}{2}}")     -> (1.0, True)    math-verify
    math_reward({"task": "countdown", "numbers": [3, 4, 5], "answer": "35"}, "\\boxed{(3+4)*5}")

The gold answer is a record's `answer` field: a GSM8K solution (the text after the last `####`), a
`\\boxed{}` solution, or the bare answer. Records of cpm-tiny's synthetic tasks (`task` field) are
graded the way their generator defines: the last `\\boxed{}` of the completion, compared as a number
(arithmetic) or checked as an expression over the given numbers (countdown).

Everything here is a small pure function of strings and dicts, so the rollout, the vote and the
benchmarks grade alike.
"""

from __future__ import annotations

import re
from fractions import Fraction

from cpmtool.data import tasks

_BOX_CMDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched, stripped.

    Nested braces are kept whole (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); an unclosed box at the
    end is ignored; `\\boxed 5` (no braces) gives `5`. None when there is no box.
    """
    best: tuple[int, str] | None = None
    for cmd in _BOX_CMDS:
        start = text.rfind(cmd)
        while start != -1:
            got = _box_at(text, start + len(cmd))
            if got is not None:
                if best is None or start > best[0]:
                    best = (start, got)
                break
            start = text.rfind(cmd, 0, start)
    return best[1].strip() if best else None


def _box_at(text: str, i: int) -> str | None:
    if i < len(text) and text[i] == " ":  # `\boxed 5`: the argument is one word
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


# `The answer is 42.`, `Final answer: 42`, GSM8K's `#### 42`; the last one wins.
_ANSWER_MARKERS = re.compile(r"(?:####|\banswer\s*(?:is\s*:?|:))\s*([^\n]+)", re.IGNORECASE)


def extract_answer(completion: str) -> str | None:
    """The final answer a completion states: its last `\\boxed{}`, else the text after its last
    `####` / `answer is` / `answer:` (to the end of that line, a final period dropped); else None."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed
    found = _ANSWER_MARKERS.findall(completion)
    if not found:
        return None
    ans = found[-1].strip().rstrip(".").strip()
    return ans or None


def gold_answer(answer) -> str | None:
    """A record's gold answer as a string: the text after the last `####` (GSM8K), the content of
    the last `\\boxed{}`, or the value itself. None when there is no usable answer."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return str(answer)
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    elif any(c in answer for c in _BOX_CMDS):
        answer = extract_boxed(answer) or answer
    answer = answer.strip()
    return answer or None


_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def parse_number(text: str) -> Fraction | None:
    """The exact value of a plain number, or None: `1,234`, `1234.0`, `-3.5`, `$18`, `18.`, `\\$5`.

    Only plain decimals: fractions, units and expressions are left to math-verify.
    """
    s = text.strip().replace("\\$", "").replace("$", "").replace("\\!", "").replace(" ", "")
    s = s.removesuffix(".")
    if not s or not any(c.isdigit() for c in s) or not _NUMBER.match(s):
        return None
    return Fraction(s.replace(",", ""))


def canonical(answer: str) -> str:
    """The voting key of an answer: equal keys mean the same answer.

    Plain numbers by value (`1,234` == `1234.0`), integer arithmetic expressions by value
    (`(3+4)*5` == `35`, as TTRL's SymPy simplification would), anything else with spaces and `$`
    removed.
    """
    value = parse_number(answer)
    if value is None:
        got = tasks.eval_countdown(answer.strip())
        value = got[0] if got is not None else None
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return answer.replace(" ", "").replace("$", "")


def answers_match(pred: str, gold: str) -> bool:
    """Is the answer `pred` equal to the gold answer `gold`? Exact for plain numbers, math-verify else."""
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return verify_latex(gold, f"\\boxed{{{pred}}}")


def verify_latex(gold: str, completion: str) -> bool:
    """math-verify's verdict on `completion` against the gold answer; False when it cannot parse either.

    The gold is wrapped as `\\boxed{gold}` (verl/NFT style); the completion is parsed with LaTeX and
    expression extraction, so its last boxed value, or else its last number or formula, counts.
    """
    from math_verify import parse, verify

    try:
        g = parse(f"\\boxed{{{gold}}}")
        p = parse(completion)
        return bool(g and p and verify(g, p))
    except Exception:  # math-verify and SymPy raise many kinds on odd input; a failed parse is wrong
        return False


def math_reward(record: dict, completion: str, *, answer_field: str = "answer") -> tuple[float | None, bool | None]:
    """(reward, correct) of `completion` for a prompt record: (1.0, True) or (0.0, False).

    (None, None) when the record has no gold answer to grade against. Records with `task`
    `arithmetic` or `countdown` need a `\\boxed{}` answer; other records are graded on the answer the
    completion states (`extract_answer`) with the fast numeric path, and by math-verify on the whole
    completion when that path cannot decide.
    """
    gold = gold_answer(record.get(answer_field))
    if gold is None:
        return None, None
    task = record.get("task")
    if task == "countdown":
        boxed = extract_boxed(completion)
        numbers = record.get("numbers")
        target = parse_number(gold)
        ok = (boxed is not None and isinstance(numbers, list) and target is not None
              and tasks.check_countdown(boxed, numbers, target))
        return float(ok), bool(ok)
    if task in tasks.TASKS:  # arithmetic: a number, so `\boxed{7+9}` cannot pass for 16
        boxed = extract_boxed(completion)
        value = parse_number(boxed) if boxed is not None else None
        ok = value is not None and value == parse_number(gold)
        return float(ok), ok
    pred = extract_answer(completion)
    g, p = parse_number(gold), parse_number(pred) if pred is not None else None
    if g is not None and p is not None:
        ok = g == p
    elif pred is not None:
        ok = answers_match(pred, gold)
    else:
        ok = verify_latex(gold, completion)
    return float(ok), ok
