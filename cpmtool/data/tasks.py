"""Synthetic reasoning tasks for cpm-tiny: multi-digit arithmetic and Countdown.

Every problem comes with a short worked answer that ends in `\\boxed{...}`, so a model trained on
these answers can be graded by a verifier (the boxed value) and rewarded in RL.

- arithmetic: column-wise addition/subtraction with carries and borrows, multiplication by one
  digit with carries, and long multiplication by partial products. The level sets the digits.
- countdown: reach a target from a few given numbers with + - * /, each number used at most once;
  the answer shows the steps and boxes the expression. The level sets how many numbers.

Generation is seeded and deterministic. The train/test split is a hash of the problem text, so a
test problem can never appear in a train stream, whatever the seeds.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Iterator
from fractions import Fraction

from cpmtool.errors import ConfigError

TASKS = ("arithmetic", "countdown")
SPLITS = ("train", "test")
LEVELS = {"arithmetic": (1, 2, 3, 4, 5), "countdown": (1, 2, 3)}
TEST_FRACTION = 0.1  # of the problem space, by hash
SYSTEM_PROMPT = None  # cpm-tiny is trained without a system turn

# ---------------------------------------------------------------- arithmetic working


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # least significant first


def _columns(a: int, b: int, op: str) -> str:
    """Column-wise working, least significant column first, one line per column.

    Each line restates what is left of the operands (so the two digits to combine sit right
    before the operator and the colon), the one-column fact, and the answer digits so far:

        436+829: 6+9=15, 5
        43+82+1: 3+2+1=6, 65
        4+8: 4+8=12, 1265

    Every step is a local copy or a table fact; no step has to count digits from afar. A borrowing
    column of a subtraction is written `13-6=7 b1` (ten plus the digit, and the borrow).
    """
    lines, carry, done = [], 0, ""
    i = 0
    while True:
        ra, rb = a // 10**i, (b if op == "*" else b // 10**i)
        x, y = ra % 10, rb % 10
        last = ra < 10 and (op == "*" or rb < 10)
        c = f"{'-' if op == '-' else '+'}{carry}" if carry else ""
        head = f"{ra}{op}{rb}{c}: "
        if op == "+":
            v = x + y + carry
            fact, digit, carry = f"{x}+{y}{c}={v}", str(v if last else v % 10), v // 10
        elif op == "-":
            v = x - y - carry
            if v < 0:
                fact, digit, carry = f"1{x}-{y}{c}={v + 10} b1", str(v + 10), 1
            else:
                fact, digit, carry = f"{x}-{y}{c}={v}", str(v), 0
        else:
            v = x * b + carry
            fact, digit, carry = f"{x}*{b}{c}={v}", str(v if last else v % 10), v // 10
        done = digit + done
        lines.append(f"{head}{fact}, {done}")
        if last:
            return "\n".join(lines)
        i += 1


def add_working(a: int, b: int) -> str:
    """Column-wise addition with carries (see `_columns`)."""
    return _columns(a, b, "+")


def sub_working(a: int, b: int) -> str:
    """Column-wise subtraction with borrows, a >= b (see `_columns`)."""
    if a < b:
        raise ValueError("sub_working needs a >= b")
    return _columns(a, b, "-")


def mul1_working(a: int, d: int) -> str:
    """Multiplication by one digit with carries (see `_columns`)."""
    return _columns(a, d, "*")


def mul_working(a: int, b: int) -> str:
    """Long multiplication: one partial product per digit of b (each shifted), then their sum."""
    parts = []
    lines = []
    for i, d in enumerate(_digits(b)):
        p = a * d * 10**i
        lines.append(f"{a}*{d * 10**i}={p}")
        parts.append(p)
    if len(parts) > 1:
        lines.append("+".join(str(p) for p in parts) + f"={sum(parts)}")
    return "\n".join(lines)


def _rand_digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


# level -> list of (kind, digits of a, digits of b); one is drawn uniformly per problem
ARITH_LEVELS = {
    1: [("add", 2, 2), ("sub", 2, 2)],
    2: [("add", 3, 3), ("sub", 3, 3)],
    3: [("add", 4, 4), ("sub", 4, 4), ("mul1", 2, 1)],
    4: [("add", 5, 5), ("sub", 5, 5), ("mul1", 3, 1)],
    5: [("add", 6, 6), ("sub", 6, 6), ("mul", 2, 2)],
}


def arithmetic_problem(rng: random.Random, level: int) -> dict:
    kind, na, nb = rng.choice(ARITH_LEVELS[level])
    a, b = _rand_digits(rng, na), (rng.randint(2, 9) if kind == "mul1" else _rand_digits(rng, nb))
    if kind == "sub" and a < b:
        a, b = b, a
    if kind == "add":
        expr, value, work = f"{a}+{b}", a + b, add_working(a, b)
    elif kind == "sub":
        expr, value, work = f"{a}-{b}", a - b, sub_working(a, b)
    elif kind == "mul1":
        expr, value, work = f"{a}*{b}", a * b, mul1_working(a, b)
    else:
        expr, value, work = f"{a}*{b}", a * b, mul_working(a, b)
    return {
        "prompt": f"Compute {expr}.",
        "answer": str(value),
        "solution": f"{work}\n\\boxed{{{value}}}",
    }


# ---------------------------------------------------------------- countdown

_OPS = ("+", "-", "*", "/")


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return None if y == 0 else x / y


def countdown_problem(rng: random.Random, level: int) -> dict:
    """Numbers 1..25, combined left to right by random ops into a positive integer target <= 999.

    Division only when exact, subtraction only when non-negative, so every step is a natural number
    and the working reads like a child's Countdown notes.
    """
    n = level + 1  # level 1: two numbers, 2: three, 3: four
    while True:
        nums = [rng.randint(1, 25) for _ in range(n)]
        order = nums[:]
        rng.shuffle(order)
        acc, expr, steps = order[0], str(order[0]), []
        ok = True
        for x in order[1:]:
            op = rng.choice(_OPS)
            if op == "-" and acc < x:
                op = "+"
            if op == "/" and (x == 1 or acc % x):
                op = "*" if acc * x <= 999 else "+"
            new = int(_apply(op, Fraction(acc), Fraction(x)))
            steps.append(f"{acc}{op}{x}={new}")
            # bracket the running expression when the next op binds tighter
            left = f"({expr})" if op in "*/" and any(c in expr for c in "+-") else expr
            expr, acc = f"{left}{op}{x}", new
            if acc <= 0 or acc > 999:
                ok = False
                break
        if ok and acc not in nums:
            break
    shown = ", ".join(str(x) for x in nums)
    return {
        "prompt": f"Use {shown} to make {acc}.",
        "answer": str(acc),
        "numbers": nums,
        "solution": "\n".join(steps) + f"\n\\boxed{{{expr}}}",
    }


_EXPR_OK = re.compile(r"^[\d+\-*/() ]+$")


def eval_countdown(expr: str) -> tuple[Fraction, list[int]] | None:
    """Value and numbers used of an expression of integers, + - * / and brackets; None if invalid."""
    if not expr or len(expr) > 200 or not _EXPR_OK.match(expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            r = _apply(_AST_OPS[type(node.op)], ev(node.left), ev(node.right))
            if r is None:
                raise ZeroDivisionError
            return r
        raise ValueError("unsupported expression")

    try:
        return ev(tree), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def check_countdown(expr: str, numbers: list[int], target: int) -> bool:
    """True iff `expr` equals `target` and uses each given number at most once."""
    got = eval_countdown(expr)
    if got is None:
        return False
    value, used = got
    pool = list(numbers)
    for u in used:
        if u not in pool:
            return False
        pool.remove(u)
    return value == target


# ---------------------------------------------------------------- grading

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, stripped; None when there is none."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def grade(record: dict, completion: str) -> bool:
    """Is `completion` a correct answer to the prompt record (arithmetic or countdown)?"""
    boxed = extract_boxed(completion)
    if boxed is None:
        return False
    if record.get("task") == "countdown":
        return check_countdown(boxed, record["numbers"], int(record["answer"]))
    return boxed.replace(",", "") == str(record["answer"])


# ---------------------------------------------------------------- streams and splits

_GENERATORS = {"arithmetic": arithmetic_problem, "countdown": countdown_problem}


def split_of(prompt: str) -> str:
    """Deterministic split of a problem by the hash of its text (stable across seeds and runs)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def _parse_levels(task: str, level) -> tuple[int, ...]:
    if level is None:
        return LEVELS[task]
    levels = (level,) if isinstance(level, int) else tuple(level)
    bad = [lv for lv in levels if lv not in LEVELS[task]]
    if bad:
        raise ConfigError(f"{task} has levels {list(LEVELS[task])}, not {bad}")
    return levels


def generate(task: str, split: str = "test", n: int = 100, seed: int = 0, level=None,
             with_solution: bool = False, unique: bool = True) -> Iterator[dict]:
    """Yield `n` prompt records of `task` from `split`, levels cycled evenly (one level or several).

    Records: `id`, `prompt`, `messages`, `answer`, `task`, `level` (+ `numbers` for countdown,
    + `solution` when `with_solution`). With `unique`, duplicates within a stream are skipped, so
    ids are unique; training streams larger than a level's problem space pass `unique=False`.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    levels = _parse_levels(task, level)
    rng = random.Random(f"{task}:{split}:{seed}")
    seen: set[str] = set()
    made, tries = 0, 0
    while made < n:
        lv = levels[made % len(levels)]
        p = _GENERATORS[task](rng, lv)
        tries += 1
        if tries > 100 * n + 1000:
            raise ConfigError(f"could not draw {n} distinct {task} problems for split {split} at levels {levels}")
        if split_of(p["prompt"]) != split or (unique and p["prompt"] in seen):
            continue
        if unique:
            seen.add(p["prompt"])
        rec = {
            "id": f"{task}-{split}-{hashlib.sha256(p['prompt'].encode()).hexdigest()[:12]}",
            "prompt": p["prompt"],
            "messages": [{"role": "user", "content": p["prompt"]}],
            "answer": p["answer"],
            "task": task,
            "level": lv,
        }
        if "numbers" in p:
            rec["numbers"] = p["numbers"]
        if with_solution:
            rec["solution"] = p["solution"]
        yield rec
        made += 1
