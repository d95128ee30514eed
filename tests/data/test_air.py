"""AIR's pure parts: judge-answer parsing on literal answers, variance, the variance filter and
pair selection on hand-made scores (expected values worked out by hand in the comments), order
combination for pairwise judging, and how input records become instructions."""

import orjson
import pytest

from cpmtool.data.air import (
    _settings,
    collect,
    combine_orders,
    instruction_text,
    keep_by_variance,
    parse_margin,
    parse_score,
    parse_verdict,
    score_variance,
    select_pair,
    select_pairwise,
    win_scores,
)
from cpmtool.errors import ConfigError
from cpmtool.io import Reject, RunStats, ensure_id, read_records

SCORES = [
    ("Score: 7", 7.0),
    ("7/10", 7.0),
    ("**8**", 8.0),
    ("Rating: 6.5", 6.5),
    ("The response is decent. Score: 7.\n", 7.0),
    ("Score: 8/10", 8.0),
    ("Score:7/10", 7.0),
    ("Score: 7.5/10", 7.5),
    ("I would rate this response 9 out of 10.", 9.0),
    ("[[6]]", 6.0),
    ("Explanation: fine.\nRating: [[4]]", 4.0),
    ("Score: **5**", 5.0),
    ("**Score:** 8", 8.0),
    ("Rating: seven", 7.0),
    ("Score: Ten", 10.0),
    ("8", 8.0),
    (" 8.\n", 8.0),
    ("10/10", 10.0),
    ("Overall: 3 out of 10, it misses the question", 3.0),
    ("Score: 7\nReason: it lists 3 steps and 2 tips", 7.0),
    ("The rating scale runs from 1 to 10. Score: 4", 4.0),  # the last marker wins
    ("Score: 7 at first sight; final score: 8", 8.0),
    ("I'd give it 2 because it is off topic.", 2.0),
    ("score = 9", 9.0),
    ("SCORE - 1", 1.0),
]


@pytest.mark.parametrize(("text", "expected"), SCORES)
def test_parse_score_reads_literal_judge_answers(text, expected):
    assert parse_score(text) == (expected, None)


@pytest.mark.parametrize(("text", "reason"), [
    ("Score: 15", "score_out_of_range"),
    ("Score: 0", "score_out_of_range"),
    ("Score: -2", "score_out_of_range"),
    ("11/10", "score_out_of_range"),
    ("Score: 4/5", "wrong_scale"),
    ("Rating: 3 out of 5", "wrong_scale"),
    ("The response is helpful but too short.", "no_score"),
    ("The process of making crepes is a delightful one.", "no_score"),
    ("", "no_score"),
    ("   \n", "no_score"),
    (None, "no_score"),
    ("Score: excellent", "no_score"),
])
def test_parse_score_failures_are_null_with_a_reason(text, reason):
    assert parse_score(text) == (None, reason)


def test_parse_score_on_another_scale():
    assert parse_score("Score: 4/5", lo=1, hi=5) == (4.0, None)
    assert parse_score("Score: 7", lo=1, hi=5) == (None, "score_out_of_range")


@pytest.mark.parametrize(("text", "expected"), [
    ("Better: A", "A"),
    ("Better: B. A misses the point.", "B"),
    ("Better: tie", "tie"),
    ("[[B]]", "B"),
    ("[[C]]", "tie"),
    ("My verdict: [[A]]", "A"),
    ("Response B is better because it answers the question.", "B"),
    ("Output (1) is better.", "A"),
    ("A is clearly better than B.", "A"),
    ("A", "A"),
    ("b.", "B"),
    ("Response A", "A"),
    ("Better: Response B", "B"),
    ("Verdict: **B**", "B"),
    ("The preferred response is 2.", "B"),
    ("Both are equally good.", "tie"),
    ("It's a tie.", "tie"),
    ("Response A is better. On second thought, better: B", "B"),
    ("Better: neither", "tie"),
])
def test_parse_verdict_reads_literal_judge_answers(text, expected):
    assert parse_verdict(text) == (expected, None)


@pytest.mark.parametrize("text", ["", None, "   ", "I cannot decide.", "Apples are better than pears.",
                                  "Both answers have merits."])
def test_parse_verdict_failures_are_null(text):
    assert parse_verdict(text) == (None, "no_verdict")


# four instructions, hand-made scores:
#   I0 [8, 3]     mean 5.5  var (2.5^2 + 2.5^2) / 2 = 6.25
#   I1 [6, 6]     mean 6    var 0
#   I2 [9, 5, 7]  mean 7    var (4 + 4 + 0) / 3 = 2.666667
#   I3 [2, 10]    mean 6    var (16 + 16) / 2 = 16
HAND = [[8, 3], [6, 6], [9, 5, 7], [2, 10]]


def test_score_variance_is_the_population_variance():
    assert [round(score_variance(s), 6) for s in HAND] == [6.25, 0.0, 2.666667, 16.0]
    with pytest.raises(ValueError):
        score_variance([])


def test_keep_top_variance_keeps_the_highest_fraction():
    v = [score_variance(s) for s in HAND]
    assert keep_by_variance(v, 0.5) == [True, False, False, True]  # ceil(0.5 * 4) = 2: I3 (16), I0 (6.25)
    assert keep_by_variance(v, 0.6) == [True, False, True, True]  # ceil(2.4) = 3: + I2 (2.67)
    assert keep_by_variance(v, 0.5, "low") == [False, True, True, False]  # I1 (0), I2 (2.67)
    assert keep_by_variance(v, 1.0) == [True] * 4
    assert keep_by_variance(v, 0.01) == [False, False, False, True]  # never fewer than one
    assert keep_by_variance([], 0.5) == []
    # ties at the cut: the first instruction wins
    assert keep_by_variance([1.0, 2.0, 2.0, 2.0], 0.5) == [False, True, True, False]


def test_select_pair_high_chosen_then_margin_nearest_the_middle():
    # min 7, margin [1, 4] (middle 2.5)
    assert select_pair([8, 3], 7, (1, 4)) is None  # margin 5 > 4
    assert select_pair([8, 3], 7, (1, 5)) == (0, 1)
    assert select_pair([6, 6], 7, (1, 4)) is None
    # I2: chosen 9 with 5 (margin 4, |4 - 2.5| = 1.5) or 7 (margin 2, 0.5): 7 is nearer the middle;
    # chosen 7 with 5 (margin 2) also qualifies but its chosen score is lower
    assert select_pair([9, 5, 7], 7, (1, 4)) == (0, 2)
    assert select_pair([9, 5, 7], 9.5, (1, 4)) is None  # nobody reaches 9.5
    assert select_pair([2, 10], 7, (1, 4)) is None  # margin 8
    assert select_pair([8, 6, 6], 7, (1, 4)) == (0, 1)  # equal candidates: the first rejected
    assert select_pair([None, 9, 6], 7, (1, 4)) == (1, 2)  # a null score never takes part
    assert select_pair([6, 2], 7, (1, 4)) is None  # chosen below --min-chosen
    assert select_pair([7, 7], 0, (0, 0)) == (0, 1)  # a zero margin only when asked for
    # the chosen score comes first: 9 vs 6.5 (margin 2.5, right in the middle) loses to chosen 10;
    # 10 vs 6.5 (3.5, 1.0 off the middle) ties 10 vs 8.5 (1.5, 1.0 off): the first rejected wins
    assert select_pair([9, 6.5, 10, 8.5], 7, (1, 4)) == (2, 1)


def test_combine_orders_cancels_position_bias():
    # i shown as A first, then j shown as A
    assert combine_orders("A", "B") == "i"  # i wins in both orders
    assert combine_orders("B", "A") == "j"
    assert combine_orders("A", "A") == "tie"  # always the first shown: position bias
    assert combine_orders("B", "B") == "tie"
    assert combine_orders("tie", "A") == "tie"
    assert combine_orders("B", None) == "j"  # one order unparsed: the other decides
    assert combine_orders(None, "B") == "i"
    assert combine_orders(None, None) is None


def test_win_scores_and_pairwise_selection():
    out = {(0, 1): "i", (0, 2): "tie", (1, 2): None}
    # r0: 1 win + 1 tie over 2 comparisons = 0.75; r1: 0 of 1; r2: one tie of 1 = 0.5
    assert win_scores(3, out) == [0.75, 0.0, 0.5]
    assert select_pairwise(win_scores(3, out), out) == (0, 1)
    out = {(0, 1): "j", (0, 2): "j", (1, 2): "i"}  # 1 beats 0 and 2, 2 beats 0
    s = win_scores(3, out)
    assert s == [0.0, 1.0, 0.5]
    assert select_pairwise(s, out) == (1, 0)  # 1 beat 0 (score 0) and 2 (0.5): the lower one
    assert win_scores(2, {(0, 1): None}) == [None, None]
    assert select_pairwise([0.5, 0.5], {(0, 1): "tie"}) is None


def test_margin_and_settings_are_checked():
    assert parse_margin("1,4") == (1.0, 4.0)
    assert parse_margin(" 0.5 , 3 ") == (0.5, 3.0)
    for bad in ("1", "1,2,3", "a,b"):
        with pytest.raises(ConfigError, match="--margin takes lo,hi"):
            parse_margin(bad)
    ok = dict(mode="pointwise", judge_samples=1, keep_top_variance=None, variance_tail="high", min_chosen=None,
              margin=None, temperature=None, template=None, max_batch=4)
    s = _settings(**ok)
    assert (s["keep"], s["min_chosen"], s["margin"]) == (1.0, 7.0, (1.0, 4.0))
    for change, msg in [({"keep_top_variance": 0.0}, "keep-top-variance"), ({"keep_top_variance": 1.5}, "keep-top"),
                        ({"margin": (3.0, 1.0)}, "--margin"), ({"mode": "listwise"}, "--mode"),
                        ({"judge_samples": 3, "temperature": 0.0}, "needs --temperature"),
                        ({"variance_tail": "mid"}, "--variance-tail"), ({"template": "Rate {response}"}, "{instruction}"),
                        ({"mode": "pairwise", "min_chosen": 8.0}, "--min-chosen")]:
        with pytest.raises(ConfigError, match=msg.replace("{", r"\{").replace("}", r"\}")):
            _settings(**{**ok, **change})


def test_instruction_text():
    assert instruction_text({"prompt": "Hi"}) == "Hi"
    assert instruction_text({"instruction": "Do X"}, "instruction") == "Do X"
    assert instruction_text({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}) == "u"
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert instruction_text({"messages": two}) == "user: a\nassistant: b\nuser: c"
    assert instruction_text({}) == "no_prompt"
    assert instruction_text({"prompt": 3}) == "bad_prompt"
    assert instruction_text({"prompt": " "}) == "empty_prompt"
    assert instruction_text({"messages": [{"role": "user"}]}) == "bad_messages"


def _jsonl(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def test_collect_groups_rollout_samples_across_files_and_reads_instruction_records(tmp_path):
    # two rollouts of the same prompts (no model field: the file stem names the generator), one
    # instruction record, and lines that are no instruction
    tiny = _jsonl(tmp_path / "tiny.jsonl", [
        {"id": "p1-0", "instruction": "Say hi", "completion": "hi", "group": "p1", "sample": 0, "reward": None},
        {"id": "p2-0", "instruction": "Count", "completion": "1 2", "group": "p2", "sample": 0},
    ])
    smol = _jsonl(tmp_path / "smol.jsonl", [
        {"id": "p1-0", "instruction": "Say hi", "completion": "Hello!", "group": "p1", "sample": 0},
        {"id": "p1-1", "instruction": "Say hi", "completion": "Hey", "group": "p1", "sample": 1, "model": "smol-x"},
        {"prompt": "no responses here"},
        {"id": "q", "prompt": "Pick", "responses": [{"text": "a", "generator": "g1"}, "b", {"completion": "c",
                                                                                             "model": "m"}]},
        {"id": "bad", "prompt": "Pick", "responses": [{"text": 3}]},
        {"id": "np", "completion": "orphan", "group": "p9"},
    ])
    stats = RunStats()
    got = list(collect(map(ensure_id, read_records([tiny, smol], stats=stats)), stats, "instruction"))
    rejects = [(g.reason, g.position[1]) for g in got if isinstance(g, Reject)]
    assert rejects == [("no_responses", 3), ("bad_responses", 5), ("no_prompt", 6)]
    items = [g for g in got if not isinstance(g, Reject)]
    assert [it.id for it in items] == ["p1", "p2", "q"]
    p1 = items[0]
    assert p1.text == "Say hi" and p1.shape == "samples"
    assert [(r.text, r.generator, r.source_id) for r in p1.responses] == [
        ("hi", "tiny", "p1-0"), ("Hello!", "smol", "p1-0"), ("Hey", "smol-x", "p1-1")]
    # the instruction's own fields, with the instruction copied to `prompt` for train-dpo
    assert p1.base == {"id": "p1", "instruction": "Say hi", "prompt": "Say hi"}
    assert [pos for _, pos in p1.lines] == [(str(tiny), 1), (str(smol), 1), (str(smol), 2)]
    q = items[2]
    assert q.shape == "instruction" and q.text == "Pick"
    assert [(r.text, r.generator) for r in q.responses] == [("a", "g1"), ("b", None), ("c", "m")]
    assert "responses" not in q.base and q.base["prompt"] == "Pick"
