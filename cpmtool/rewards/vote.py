"""Majority vote over a group of samples (TTRL): the pseudo-label and the reward for agreeing with it.

    v = majority(["18", "18.0", "17", None])   # Vote(label="18", answer="18", count=2, ratio=0.5)
    vote_rewards(["18", "18.0", "17", None], v)   # [1.0, 1.0, 0.0, 0.0]

As in TTRL (`ttrl_utils.py`): answers are grouped by a canonical form, the most common one is the
label, a tie goes to the answer seen first, the ratio's denominator counts the samples without an
answer too, and a sample without an answer never agrees. With no answer at all there is no label
and every reward is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cpmtool.rewards.math import canonical


@dataclass(frozen=True)
class Vote:
    label: str | None  # canonical key of the majority answer
    answer: str | None  # the majority answer as the first sample that gave it wrote it
    count: int
    ratio: float  # count / number of samples


def majority(answers: Sequence[str | None], key: Callable[[str], str] = canonical) -> Vote:
    """The majority answer of `answers` (None = a sample that gave no answer); ties: first seen."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        k = key(a)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, a)
    if not counts:
        return Vote(None, None, 0, 0.0)
    label = max(counts, key=counts.__getitem__)  # max keeps the first of equal counts; dicts keep insertion order
    return Vote(label, first[label], counts[label], counts[label] / len(answers))


def vote_rewards(answers: Sequence[str | None], vote: Vote, key: Callable[[str], str] = canonical) -> list[float]:
    """1.0 for each sample whose answer agrees with the vote's label, else 0.0."""
    return [float(vote.label is not None and a is not None and key(a) == vote.label) for a in answers]
