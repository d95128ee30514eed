"""Math verification on literal inputs: boxed extraction, the fast numeric path, math-verify, cpm-tiny tasks."""

from fractions import Fraction

import pytest

from cpmtool.rewards.math import (
    answers_match,
    canonical,
    extract_answer,
    extract_boxed,
    gold_answer,
    math_reward,
    parse_number,
)


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("x \\boxed{\\sqrt{\\frac{a}{b}}} y", "\\sqrt{\\frac{a}{b}}"),
    ("\\boxed{ 7 }", "7"),
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),
    ("\\fbox{9}", "9"),
    ("\\boxed{1} \\fbox{2}", "2"),
    ("\\boxed 5 apples", "5"),
    ("no box here", None),
    ("\\boxed{", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize("text, want", [
    ("work\n#### 18", "18"),
    ("The answer is 42.", "42"),
    ("Final answer: 7\nbye", "7"),
    ("The answer is: 3", "3"),
    ("#### 1\n\\boxed{2}", "2"),  # a box wins over markers
    ("nothing", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("answer, want", [
    ("Janet sells 9 eggs.\nShe makes $18.\n#### 18", "18"),
    ("work\n\\boxed{70,000}", "70,000"),
    (" 5 ", "5"),
    (12, "12"),
    ("", None),
    (None, None),
    (True, None),
    ({"x": 1}, None),
])
def test_gold_answer(answer, want):
    assert gold_answer(answer) == want


@pytest.mark.parametrize("text, want", [
    ("1,234", Fraction(1234)), ("1234.0", Fraction(1234)), ("-3.5", Fraction(-7, 2)), ("$18", Fraction(18)),
    ("18.", Fraction(18)), ("\\$5", Fraction(5)), (".5", Fraction(1, 2)), ("1 000", Fraction(1000)),
    ("1,23", None), ("\\frac{1}{2}", None), ("3/4", None), ("18 dollars", None), ("", None), ("-", None),
    (".", None),
])
def test_parse_number(text, want):
    assert parse_number(text) == want


@pytest.mark.parametrize("pred, gold, ok", [
    ("1,234", "1234.0", True),
    ("1234", "1235", False),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\sqrt{4}", "2", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\frac{1}{3}", "0.5", False),
    ("\\text{nonsense}{", "2", False),
])
def test_answers_match_uses_math_verify_past_plain_numbers(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_canonical_groups_equal_answers():
    assert canonical("1,234") == canonical("1234.0") == "1234"
    assert canonical("(3+4)*5") == canonical("35") == "35"
    assert canonical("0.5") == "1/2"
    assert canonical("\\frac{1}{2}") == "\\frac{1}{2}"
    assert canonical("x + 1") == canonical("x+1")


GSM = {"question": "q", "answer": "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"}


@pytest.mark.parametrize("completion, reward", [
    ("9*2 = 18\n#### 18", 1.0),
    ("so the answer is \\boxed{18.0}", 1.0),
    ("The answer is $18.", 1.0),
    ("she makes 18 dollars", 1.0),  # no stated answer: math-verify takes the last number
    ("The answer is 17", 0.0),
    ("\\boxed{\\frac{36}{2}}", 1.0),
    ("I don't know", 0.0),
])
def test_math_reward_gsm8k(completion, reward):
    assert math_reward(GSM, completion) == (reward, reward == 1.0)


def test_math_reward_without_gold_cannot_grade():
    assert math_reward({"prompt": "hi"}, "\\boxed{1}") == (None, None)
    assert math_reward({"prompt": "hi", "gold": "1"}, "\\boxed{1}", answer_field="gold") == (1.0, True)


def test_math_reward_dispatches_on_task():
    arith = {"task": "arithmetic", "prompt": "Compute 7+9.", "answer": "16"}
    assert math_reward(arith, "7+9=16\n\\boxed{16}") == (1.0, True)
    assert math_reward(arith, "\\boxed{7+9}") == (0.0, False)  # an expression is not the number
    assert math_reward(arith, "7+9=16") == (0.0, False)  # task answers must be boxed
    cd = {"task": "countdown", "prompt": "Use 3, 4, 5 to make 35.", "numbers": [3, 4, 5], "answer": "35"}
    assert math_reward(cd, "3+4=7\n7*5=35\n\\boxed{(3+4)*5}") == (1.0, True)
    assert math_reward(cd, "\\boxed{35}") == (0.0, False)  # 35 is not one of the numbers
    assert math_reward(cd, "\\boxed{(3+4)*5*1}") == (0.0, False)  # 1 was not given
    assert math_reward(cd, "\\boxed{3*4+5}") == (0.0, False)
    assert math_reward({**cd, "numbers": None}, "\\boxed{(3+4)*5}") == (0.0, False)


def test_math_reward_agrees_with_the_task_grader():
    from cpmtool.data import tasks

    for task in tasks.TASKS:
        for rec in tasks.generate(task, "test", 20, seed=1, with_solution=True):
            assert math_reward(rec, rec["solution"]) == (1.0, True), rec
            assert tasks.grade(rec, rec["solution"])
