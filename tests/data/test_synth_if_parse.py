"""synth-if: parsing model answers (good and malformed) and the pure stages (compose, assembly)."""

import random

import pytest

from cpmtool.data.synth_if.parse import extract_json, parse_decomposition, parse_judgment, parse_question
from cpmtool.data.synth_if.stages import (
    PoolConstraint,
    SynthStats,
    _assemble,
    compose_one,
    query_of,
    render_prompt,
)
from cpmtool.io import JsonlWriter, Reject
from cpmtool.rewards.ifeval import CONFLICTS, INSTRUCTIONS, check_record

# ---------------------------------------------------------------- JSON in prose


@pytest.mark.parametrize(("text", "want"), [
    ('{"a": 1}', {"a": 1}),
    ('Sure! Here it is:\n```json\n{"a": [1, 2],}\n```\nHope it helps.', {"a": [1, 2]}),
    ("Answer: {'a': 'it\\'s', 'b': True} -- done", {"a": "it's", "b": True}),
    ("I don't know. {\"a\": \"}{\"} and {\"b\": 2}", {"a": "}{"}),  # braces inside strings; first object wins
    ("{'a': true, 'b': null}", {"a": True, "b": None}),
])
def test_extract_json_finds_the_object(text, want):
    assert extract_json(text) == want


@pytest.mark.parametrize("text", ["", "no json here", "{unclosed: ", "[1, 2]", "{'a': }", None])
def test_extract_json_gives_none_on_malformed(text):
    assert extract_json(text) is None


def test_extract_json_arrays():
    assert extract_json("verdicts: [\"YES\", \"NO\"]", list) == ["YES", "NO"]


# ---------------------------------------------------------------- decomposition

GOOD = """Here is the analysis:
```json
{"Complex": true, "Basic Query": "Describe crepes.",
 "Numerical Constraints": [{"constraint": "in three steps", "simplified query": "Describe crepes simply."}],
 "stylistic constraints": [{"Constraint": "use simple words", "Simplified_Query": "Describe crepes in three steps."}],
 "Format": "as a numbered list",
 "Mood Constraints": [{"constraint": "ignored: not a known type"}]}
```"""


def test_decomposition_good_answer():
    d = parse_decomposition(GOOD)
    assert d["basic_query"] == "Describe crepes."
    assert d["constraints"] == [
        {"type": "numerical", "constraint": "in three steps", "simplified_query": "Describe crepes simply."},
        {"type": "stylistic", "constraint": "use simple words", "simplified_query": "Describe crepes in three steps."},
        {"type": "format", "constraint": "as a numbered list", "simplified_query": None},
    ]


@pytest.mark.parametrize(("text", "reason"), [
    ('{"Complex": false}', "no_constraints"),
    ("{'Complex': 'False'}", "no_constraints"),
    ('{"Complex": true, "Basic Query": "x", "Format Constraints": []}', "no_constraints"),
    ('{"Complex": true, "Format Constraints": [{"constraint": "  "}, 3]}', "no_constraints"),
    ("The instruction asks for a poem with four lines.", "unparsable_decomposition"),
    ('{"Complex": true, "Basic Query": "x"', "no_constraints"),  # repaired, but nothing in it
])
def test_decomposition_malformed_is_a_reason(text, reason):
    assert parse_decomposition(text) == reason


@pytest.mark.parametrize("text", [
    # cut off by max_tokens mid-list (the answer of smollm2-135m with --prefill, 120 tokens)
    '{"Complex": true, "Basic Query": "x", "Format Constraints": [{"constraint": "a list", "simplified query": "y',
    # a stray closing brace before the next key
    '{"Complex": true, "Basic Query": "x", "Format Constraints": [{"constraint": "a list", "simplified query": "y"}},',
])
def test_decomposition_cut_off_or_with_a_stray_brace_is_repaired(text):
    d = parse_decomposition(text)
    assert d["basic_query"] == "x"
    assert d["constraints"][0]["type"] == "format" and d["constraints"][0]["constraint"] == "a list"
    assert d["constraints"][0]["simplified_query"] == "y"


# ---------------------------------------------------------------- evaluation questions


@pytest.mark.parametrize(("text", "want"), [
    ('{"question": "Does the response use bullet points?"}', "Does the response use bullet points?"),
    ('```\n{"question": ["Is it in French?", "x"]}\n```', "Is it in French?"),
    ("Question: Is the answer shorter than 50 words?\nThanks", "Is the answer shorter than 50 words?"),
    ('{"question": ""}', None),
    ('{"q": "Is it short?"}', None),
    ("I cannot help with that.", None),
])
def test_question_parsing(text, want):
    assert parse_question(text) == want


# ---------------------------------------------------------------- judge verdicts


@pytest.mark.parametrize(("text", "n", "want"), [
    ('{"Question 1": {"explanation": "uses {braces}", "score": "YES"}, "Question 2": {"score": "No"}}', 2,
     [True, False]),
    ('```json\n{"question 2": {"score": "yes"}, "question 1": {"score": "YES."}}\n```', 2, [True, True]),
    ('{"Question 1": "NO"}', 1, [False]),
    ('[{"explanation": "ok", "score": "YES"}, {"score": "NO"}]', 2, [True, False]),
    ("Question 1: the response is short, so YES.\nQuestion 2 - NO, it has commas", 2, [True, False]),
])
def test_judgment_parsing(text, n, want):
    assert parse_judgment(text, n) == want


@pytest.mark.parametrize(("text", "n"), [
    ('{"Question 1": {"score": "YES"}}', 2),  # one verdict missing: fails rather than passes
    ('{"Question 1": {"explanation": "unsure", "score": "maybe"}}', 1),
    ("The response looks fine to me.", 1),
    ("", 1),
])
def test_judgment_malformed_is_none(text, n):
    assert parse_judgment(text, n) is None


# ---------------------------------------------------------------- compose

POOL = [PoolConstraint("use simple words", "Does the response use simple words?", "stylistic", "other"),
        PoolConstraint("mention a price", "Does the response mention a price?", "content", "self")]


def test_query_of_fields():
    assert query_of({"instruction": " Add ", "input": "2 and 3"}) == "Add\n\n2 and 3"
    assert query_of({"instruction": "Add", "input": ""}) == "Add"
    assert query_of({"query": "q", "prompt": "p"}) == "q"
    assert query_of({"prompt": "  "}) is None


def test_render_prompt():
    assert render_prompt("Q?", ["use simple words", "Answer in JSON."]) == (
        "Q?\n\nFollow these constraints:\n- Use simple words.\n- Answer in JSON.")
    assert render_prompt("Q?", []) == "Q?"


def test_compose_from_ifeval_only_is_verifiable():
    rec = {"id": "r1", "eval_questions": ["Is it about crepes?"]}
    ids = [i for i in INSTRUCTIONS if i != "detectable_format:constrained_response"]  # it blocks every other one
    out = compose_one(rec, "Describe crepes.", [], rounds=3, pool_ratio=0.5, ifeval_ids=ids, rng=random.Random(3))
    assert len(out["added_constraints"]) == 3 and {a["source"] for a in out["added_constraints"]} == {"ifeval"}
    assert out["instruction_id_list"] == [a["id"] for a in out["added_constraints"]]
    assert len(out["kwargs"]) == 3
    for i, a in enumerate(out["instruction_id_list"]):
        assert not CONFLICTS[a] & set(out["instruction_id_list"][:i])
    assert out["eval_questions"] == ["Is it about crepes?"]  # the input's own questions stay
    assert out["prompt"].startswith("Describe crepes.\n\nFollow these constraints:\n- ")
    assert all(a["text"] in out["prompt"] for a in out["added_constraints"])
    check_record(out, "any response")  # the kwargs are complete


def test_compose_from_the_pool_skips_the_records_own_constraints():
    rec = {"id": "self"}
    out = compose_one(rec, "Sell me a pen.", POOL, rounds=2, pool_ratio=1.0, ifeval_ids=None, rng=random.Random(0))
    pool_added = [a for a in out["added_constraints"] if a["source"] == "pool"]
    assert [a["text"] for a in pool_added] == ["use simple words"]  # "mention a price" comes from itself
    assert out["eval_questions"] == ["Does the response use simple words?"]
    # the second round found no unused pool constraint and fell back to IFEval
    assert [a["source"] for a in out["added_constraints"]] == ["pool", "ifeval"]


def test_compose_keeps_existing_instructions_and_respects_conflicts():
    rec = {"id": "x", "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]}
    out = compose_one(rec, "List fruits.", [], rounds=3, pool_ratio=0.0, ifeval_ids=None, rng=random.Random(1))
    assert out["instruction_id_list"][0] == "detectable_format:json_format"
    assert not CONFLICTS["detectable_format:json_format"] & set(out["instruction_id_list"][1:])
    only = compose_one({"id": "y"}, "q", [], rounds=2, pool_ratio=0.0,
                       ifeval_ids=["detectable_format:constrained_response"], rng=random.Random(0))
    assert only["instruction_id_list"] == ["detectable_format:constrained_response"]  # conflicts with itself


# ---------------------------------------------------------------- filter assembly


def _run_assemble(rec, checks, judged, questions, tmp_path, drop=True):
    stats = SynthStats()
    pairs = tmp_path / "pairs.jsonl"
    with JsonlWriter(pairs) as w:
        out = list(_assemble(rec, ("f", 1), checks, judged, questions, stats, w, drop))
    import orjson

    return out, [orjson.loads(x) for x in pairs.read_bytes().splitlines()], stats


def test_assembly_first_pass_is_sft_last_pass_and_last_fail_are_the_pair(tmp_path):
    rec = {"id": "p", "prompt": "Q", "responses": ["a", "b", "c", "d"], "finish_reasons": ["stop"] * 4,
           "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    checks = [[False], [True], [True], [True]]
    judged = [[True, True], [True, True], [True, False], [True, True]]
    out, pairs, stats = _run_assemble(rec, checks, judged, ["q1", "q2"], tmp_path)
    assert len(out) == 1 and out[0]["completion"] == "b" and out[0]["satisfied"] is True
    assert "responses" not in out[0] and out[0]["instruction_id_list"] == ["punctuation:no_comma"]
    assert [v["score"] for v in out[0]["verdicts"]] == [pytest.approx(2 / 3), 1.0, pytest.approx(2 / 3), 1.0]
    assert [v["pass"] for v in out[0]["verdicts"]] == [False, True, False, True]
    (pair,) = pairs
    assert (pair["chosen"], pair["rejected"]) == ("d", "c")  # UltraIF: last passing, last failing
    assert pair["prompt"] == "Q" and pair["id"] == "p-pair"
    assert pair["margin"] == pytest.approx(1 - 2 / 3) and pair["score_rejected"] == pytest.approx(2 / 3)
    assert stats.counts == {"pairs": 1}


def test_assembly_unsatisfied_and_unparsable_judgments(tmp_path):
    rec = {"id": "u", "prompt": "Q", "responses": ["a", "  "]}
    out, pairs, _ = _run_assemble(rec, [[], []], [False, [False]], ["q1"], tmp_path)
    assert isinstance(out[0], Reject) and out[0].reason == "unsatisfied" and pairs == []
    assert out[0].record["verdicts"][0]["judge"] == "unparsable"
    kept, _, _ = _run_assemble(rec, [[], []], [False, [False]], ["q1"], tmp_path, drop=False)
    assert kept[0]["completion"] == "  " and kept[0]["satisfied"] is False  # the last sample, as UltraIF writes
    # no checks at all: a non-empty response passes, an empty one fails
    out, pairs, _ = _run_assemble(rec, [[], []], [None, None], [], tmp_path)
    assert out[0]["completion"] == "a" and [v["score"] for v in out[0]["verdicts"]] == [1.0, 0.0]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("a", "  ")


def test_repair_is_only_for_json_looking_text():
    # prose braces before the real object are not "repaired" into it
    assert extract_json('Use {braces} like this: {"a": "x"}') == {"a": "x"}
    # a broken outer object is repaired before its inner members are taken for the answer
    broken = '{"Basic Query": "q", "Format Constraints": [{"constraint": "a list"}}, "x'
    assert parse_decomposition(broken)["basic_query"] == "q"
