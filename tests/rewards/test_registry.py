"""`load_reward`: names, user functions, ifeval before it lands."""

import importlib.util

import pytest

from cpmtool.errors import ConfigError, CpmtoolError
from cpmtool.rewards import load_reward, normalise_reward


def test_builtin_names():
    assert load_reward("none")({"answer": "1"}, "\\boxed{1}") == (None, None)
    assert load_reward("math")({"answer": "1"}, "\\boxed{1}") == (1.0, True)
    assert load_reward("math", answer_field="gold")({"gold": "2"}, "\\boxed{1}") == (0.0, False)
    with pytest.raises(ConfigError, match="unknown reward 'maths'"):
        load_reward("maths")


def test_user_function_from_a_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def length(record, completion):\n    return len(completion) / 10\n"
        "def both(record, completion):\n    return 0.5, completion == record['want']\n"
        "def flag(record, completion):\n    return 'x' in completion\n"
        "def broken(record, completion):\n    return 1 / 0\n"
        "def odd(record, completion):\n    return 'yes'\n"
    )
    assert load_reward(f"{f}:length")({}, "abcde") == (0.5, None)
    assert load_reward(f"{f}:both")({"want": "a"}, "a") == (0.5, True)
    assert load_reward(f"{f}:flag")({}, "xy") == (1.0, True)
    with pytest.raises(CpmtoolError, match="reward .*:broken failed on record 'r1': ZeroDivisionError"):
        load_reward(f"{f}:broken")({"id": "r1"}, "a")
    with pytest.raises(CpmtoolError, match="returned 'yes'"):
        load_reward(f"{f}:odd")({}, "a")
    with pytest.raises(ConfigError, match="has no function nope"):
        load_reward(f"{f}:nope")
    with pytest.raises(ConfigError, match="no such file"):
        load_reward(f"{tmp_path}/missing.py:f")


def test_user_function_from_a_module():
    assert load_reward("cpmtool.rewards.math:math_reward")({"answer": "3"}, "\\boxed{3}") == (1.0, True)
    with pytest.raises(ConfigError, match="cannot import no_such_module_xyz"):
        load_reward("no_such_module_xyz:f")


def test_normalise_reward():
    assert normalise_reward(None) == (None, None)
    assert normalise_reward(False) == (0.0, False)
    assert normalise_reward(2) == (2.0, None)
    assert normalise_reward((1, None)) == (1.0, None)
    assert normalise_reward((None, None)) == (None, None)  # cannot grade (ifeval without instructions)


def test_ifeval_is_wired_lazily():
    if importlib.util.find_spec("cpmtool.rewards.ifeval") is None:
        with pytest.raises(CpmtoolError, match="^--reward ifeval: not implemented yet"):
            load_reward("ifeval")
    else:
        assert callable(load_reward("ifeval"))
