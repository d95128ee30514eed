"""Synthetic tasks: seeded streams, disjoint splits, answers recomputed independently, graders."""

from __future__ import annotations

import re

import pytest

from cpmtool.data import tasks
from cpmtool.errors import ConfigError


def _operands(prompt: str) -> tuple[int, str, int]:
    a, op, b = re.fullmatch(r"Compute (\d+)([+*-])(\d+)\.", prompt).groups()
    return int(a), op, int(b)


def test_streams_are_seeded_and_deterministic():
    a = list(tasks.generate("arithmetic", "train", 50, seed=3, with_solution=True))
    b = list(tasks.generate("arithmetic", "train", 50, seed=3, with_solution=True))
    c = list(tasks.generate("arithmetic", "train", 50, seed=4))
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_are_disjoint_whatever_the_seeds(task):
    train = {r["prompt"] for s in range(3) for r in tasks.generate(task, "train", 600, seed=s)}
    test = {r["prompt"] for s in range(3) for r in tasks.generate(task, "test", 200, seed=s)}
    assert train and test and not train & test
    assert all(tasks.split_of(p) == "test" for p in test)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_records_have_the_prompt_contract_and_unique_ids(task):
    recs = list(tasks.generate(task, "test", 120, seed=0))
    assert len({r["id"] for r in recs}) == 120
    for r in recs:
        assert r["task"] == task and r["level"] in tasks.LEVELS[task]
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}]
        assert isinstance(r["answer"], str)
    # levels are cycled evenly
    assert {r["level"] for r in recs} == set(tasks.LEVELS[task])


def test_level_selects_the_difficulty():
    for lv, digits in ((1, 2), (3, 4), (5, 6)):
        for r in tasks.generate("arithmetic", "test", 30, seed=1, level=lv):
            a, op, b = _operands(r["prompt"])
            if op in "+-":  # the level's multiplications have their own sizes
                assert len(str(a)) == digits
    with pytest.raises(ConfigError, match="levels"):
        list(tasks.generate("arithmetic", "test", 1, level=9))
    with pytest.raises(ConfigError, match="unknown task"):
        list(tasks.generate("poetry", "test", 1))
    with pytest.raises(ConfigError, match="unknown split"):
        list(tasks.generate("arithmetic", "dev", 1))


def test_arithmetic_answers_and_working_are_correct():
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for r in tasks.generate("arithmetic", "train", 500, seed=7, with_solution=True):
        a, op, b = _operands(r["prompt"])
        assert int(r["answer"]) == ops[op](a, b) >= 0
        assert tasks.extract_boxed(r["solution"]) == r["answer"]
        assert tasks.grade(r, r["solution"])
        # every line `rest: fact, digits so far` holds a true fact, and the last digits are the answer
        work = r["solution"].splitlines()[:-1]
        for line in work:
            if op in "+-" or len(str(b)) == 1:
                fact = line.split(": ")[1].split(", ")[0].split(" b1")[0]
            else:
                fact = line
            lhs, rhs = fact.split("=")[-2:] if op in "+-" or len(str(b)) == 1 else fact.split("=")
            assert eval(lhs) == int(rhs), line  # noqa: S307 - digits and + - * only
        if op in "+-" or len(str(b)) == 1:
            assert int(work[-1].split(", ")[-1]) == int(r["answer"])


def test_column_working_shows_carries_borrows_and_digits_so_far():
    assert tasks.add_working(436, 829) == "436+829: 6+9=15, 5\n43+82+1: 3+2+1=6, 65\n4+8: 4+8=12, 1265"
    assert tasks.sub_working(938, 364) == "938-364: 8-4=4, 4\n93-36: 13-6=7 b1, 74\n9-3-1: 9-3-1=5, 574"
    assert tasks.sub_working(100, 99) == "100-99: 10-9=1 b1, 1\n10-9-1: 10-9-1=0 b1, 01\n1-0-1: 1-0-1=0, 001"
    assert tasks.mul1_working(347, 8) == "347*8: 7*8=56, 6\n34*8+5: 4*8+5=37, 76\n3*8+3: 3*8+3=27, 2776"
    assert tasks.mul_working(47, 36) == "47*6=282\n47*30=1410\n282+1410=1692"
    with pytest.raises(ValueError):
        tasks.sub_working(3, 4)


def test_countdown_answers_reach_the_target_with_the_given_numbers():
    for r in tasks.generate("countdown", "train", 300, seed=2, with_solution=True):
        expr = tasks.extract_boxed(r["solution"])
        assert len(r["numbers"]) == r["level"] + 1
        assert tasks.check_countdown(expr, r["numbers"], int(r["answer"]))
        assert tasks.grade(r, r["solution"])


def test_countdown_checker_accepts_valid_and_rejects_invalid():
    nums, target = [3, 7, 25], 46
    assert tasks.check_countdown("25+3*7", nums, target)
    assert tasks.check_countdown("(25-7)*3-8", [25, 7, 3, 8], 46)
    assert tasks.check_countdown("7*3+25", nums, target)
    assert not tasks.check_countdown("25+21", nums, target)  # 21 is not given
    assert not tasks.check_countdown("25+3*7+3-3", nums, target)  # 3 used three times
    assert not tasks.check_countdown("25+3*7+1", nums, target)  # wrong value
    assert not tasks.check_countdown("25/0+3", nums, target)
    assert not tasks.check_countdown("__import__('os')", nums, target)
    assert not tasks.check_countdown("25**2", nums, 625)
    assert not tasks.check_countdown("", nums, target)
    assert tasks.check_countdown("(7+25)/(3+5)", [7, 25, 3, 5], 4)  # exact rational arithmetic
    assert not tasks.check_countdown("7/2*2", [7, 2, 2], 6)


def test_grade_reads_the_last_box():
    rec = {"task": "arithmetic", "answer": "936"}
    assert tasks.grade(rec, "7+9=16\n\\boxed{936}")
    assert tasks.grade(rec, "\\boxed{1} no, \\boxed{ 936 }")
    assert not tasks.grade(rec, "\\boxed{936} no, \\boxed{937}")
    assert not tasks.grade(rec, "936")


def test_cli_writes_prompt_records(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "CPMTOOL_HOME": str(tmp_path)}
    args = [sys.executable, "-m", "cpmtool", "models", "tasks", "--task", "countdown", "--split", "test",
            "--n", "5", "--seed", "2", "--level", "2"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert recs == list(tasks.generate("countdown", "test", 5, seed=2, level=2))
    bad = subprocess.run([*args[:6], "poetry"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "cpmtool models: error: unknown task 'poetry' (valid: arithmetic, countdown)")
