"""The TTRL majority vote on literal answers."""

from cpmtool.rewards.vote import Vote, majority, vote_rewards


def test_majority_and_ratio_count_unanswered_samples():
    answers = ["18", "17", "18.0", None, "1,8"]
    v = majority(answers)
    assert v == Vote(label="18", answer="18", count=2, ratio=0.4)
    assert vote_rewards(answers, v) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_ties_go_to_the_first_seen_answer():
    assert majority(["5", "7", "7", "5"]).label == "5"
    assert majority(["7", "5", "5", "7"]).label == "7"
    assert majority([None, "b", "a"]).answer == "b"


def test_equal_values_vote_together():
    v = majority(["(3+4)*5", "35", "3*4+5"])
    assert (v.label, v.answer, v.count) == ("35", "(3+4)*5", 2)
    assert vote_rewards(["(3+4)*5", "35", "3*4+5"], v) == [1.0, 1.0, 0.0]


def test_no_answers_no_label_no_reward():
    v = majority([None, None])
    assert v == Vote(None, None, 0, 0.0)
    assert vote_rewards([None, None], v) == [0.0, 0.0]


def test_unanimous():
    v = majority(["4"] * 3)
    assert v.ratio == 1.0 and vote_rewards(["4"] * 3, v) == [1.0] * 3
