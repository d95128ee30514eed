"""Rewards: verifiers that grade a completion for a prompt record, and the TTRL majority vote.

A reward function takes `(record, completion)` and returns `(reward, correct)`: a float (None when
it cannot grade, e.g. no gold answer) and a bool or None. `load_reward(spec)` gives one by name:

- `math`: `cpmtool.rewards.math.math_reward` (boxed / GSM8K answers, math-verify, cpm-tiny tasks).
- `ifeval`: the instruction-constraint checkers of `cpmtool.rewards.ifeval` (imported lazily).
- `none`: no grading; `reward` and `correct` stay null.
- `module:function` or `path/to/file.py:function`: a user function `(record, completion)` returning
  a float, a bool, or `(float, bool)`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from cpmtool.errors import ConfigError, CpmtoolError

RewardFn = Callable[[dict, str], tuple[float | None, bool | None]]
REWARDS = ("math", "ifeval", "none")


def load_reward(spec: str, *, answer_field: str = "answer") -> RewardFn:
    """The reward function named by `spec` (see the module docstring).

    Raises:
        ConfigError: an unknown name, or a `module:function` that cannot be imported.
        CpmtoolError: `ifeval` before its checkers exist.
    """
    if spec == "none":
        return _no_reward
    if spec == "math":
        from cpmtool.rewards.math import math_reward

        return lambda record, completion: math_reward(record, completion, answer_field=answer_field)
    if spec == "ifeval":
        return _ifeval()
    if ":" in spec:
        return _user_reward(spec)
    raise ConfigError(f"unknown reward {spec!r} (valid: {', '.join(REWARDS)}, or module:function)")


def _no_reward(record: dict, completion: str) -> tuple[None, None]:
    return None, None


def _ifeval() -> RewardFn:
    try:
        mod = importlib.import_module("cpmtool.rewards.ifeval")
    except ModuleNotFoundError as e:
        if e.name != "cpmtool.rewards.ifeval":
            raise
        raise CpmtoolError("--reward ifeval: not implemented yet (cpmtool.rewards.ifeval has not landed)") from None
    fn = getattr(mod, "ifeval_reward", None) or getattr(mod, "reward", None)
    if fn is None:
        raise CpmtoolError("--reward ifeval: cpmtool.rewards.ifeval has no ifeval_reward(record, completion)")
    return _normalised(fn, "ifeval")


def _user_reward(spec: str) -> RewardFn:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"--reward {spec!r}: expected module:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--reward {spec!r}: no such file {where}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(f"--reward {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: {where} has no function {name}")
    return _normalised(fn, spec)


def _normalised(fn: Callable, name: str) -> RewardFn:
    def reward(record: dict, completion: str) -> tuple[float | None, bool | None]:
        try:
            out = fn(record, completion)
        except Exception as e:  # report the user's bug as one line naming the record
            raise CpmtoolError(f"reward {name} failed on record {record.get('id')!r}: {type(e).__name__}: {e}") from e
        return normalise_reward(out, name)

    return reward


def normalise_reward(out, name: str = "reward") -> tuple[float | None, bool | None]:
    """A reward function's return value as (reward, correct): bool -> (1.0/0.0, bool), number ->
    (float, None), (number, bool) -> as is, None or (None, None) (cannot grade) -> (None, None)."""
    if out is None or out == (None, None):
        return None, None
    if isinstance(out, bool):
        return float(out), out
    if isinstance(out, (int, float)):
        return float(out), None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (int, float)):
        return float(out[0]), (None if out[1] is None else bool(out[1]))
    raise CpmtoolError(f"reward {name} returned {out!r}; expected a float, a bool or (float, bool)")


__all__ = ["REWARDS", "RewardFn", "load_reward", "normalise_reward"]
