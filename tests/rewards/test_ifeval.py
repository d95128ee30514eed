"""IFEval checkers: every instruction on literal responses that follow it and that do not."""

import os
import random
import subprocess
import sys

import orjson
import pytest

from cpmtool.errors import InputError
from cpmtool.rewards import load_reward
from cpmtool.rewards.ifeval import (
    CONFLICTS,
    INSTRUCTIONS,
    check,
    check_record,
    count_sentences,
    count_words,
    ifeval_reward,
    loose_variants,
    sample_instruction,
    split_sentences,
)

# (id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["tea", "Cup"]}, "A cup of TEA.", "A cup of coffee."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "Cat and cat.", "One cat."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat.", "Cat, cat."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "Badly done, badge.", "It was ugly."),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 3, "let_relation": "at least"},
     "Zz z.", "zz only"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
     "zz only", "ZZZ"),
    ("language:response_language", {"language": "es"}, "Hola, ¿cómo estás? Me llamo Juan y vivo en Madrid.",
     "Hello, how are you? My name is John and I live in London."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One! Dr. Smith agreed.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "One. Two? Three.", "One. Two."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.\n***",
     "First.\n***\n***\nSecond."),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"}, "only three words",
     "now it's four words"),  # it's = 2 words (\w+)
    ("length_constraints:number_words", {"num_words": 4, "relation": "at least"}, "a b c d", "a b c"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "First we go.\n\n\"Then, we stop.", "First we go.\n\nNext we stop."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "A.\n\nthen b.", "A.\n\nthen b.\n\nC."),  # three paragraphs, not two
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
     "Dear [name], hello."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. see you", "Bye. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\np. p. s. more", "Bye.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Items:\n* one\n- two", "* one\n** bold\nthree"),
    ("detectable_format:constrained_response", {}, "Well... My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**",
     "*one* and ** ** and **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nend", "Section 1\nintro\nSection two"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<A Title>>\nbody", "<< >>\nbody <<broken\n>>"),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.",
     "Sure! Write a poem. Roses..."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"... done. any other questions?"  ',
     "Any other questions? Done."),
    ("startend:quotation", {}, '  "Quoted answer."\n', '"Half quoted.'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY, VERY good. DON'T", "Only ONE here."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE here.", "TWO CAPS"),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
     "This is an English sentence about the weather today."),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather today.",
     "this is an English sentence about the weather today."),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_strict(iid, kwargs, good, bad):
    assert check(iid, good, kwargs), f"{iid} should follow: {good!r}"
    assert not check(iid, bad, kwargs), f"{iid} should not follow: {bad!r}"


def test_every_registered_instruction_has_cases():
    assert len(INSTRUCTIONS) == 25
    assert {c[0] for c in CASES} == set(INSTRUCTIONS)


def test_blank_response_follows_nothing():
    # no_comma would hold on "", but IFEval counts an empty response as not following
    assert not check("punctuation:no_comma", "   ")
    assert not check("punctuation:no_comma", "", loose=True)


def test_loose_drops_first_last_lines_and_asterisks():
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "a\nb\nc", "*b*\nc", "a\n*b*", "*b*", "b\nc", "a\nb", "b"]
    preamble = "Sure, here it is:\n\"All quoted.\""
    assert not check("startend:quotation", preamble)
    assert check("startend:quotation", preamble, loose=True)
    bold = "**Hello** world, no."
    kw = {"keyword": "**hello**", "frequency": 1, "relation": "at least"}
    assert check("keywords:frequency", bold, kw)
    assert check("punctuation:no_comma", "Here you go, friend:\nno commas at all", loose=True)
    assert not check("punctuation:no_comma", "a, b\nc, d\ne, f", loose=True)  # middle line keeps a comma


def test_sentences_and_words_by_hand():
    assert split_sentences('He said "Hi." Then e.g. J. Smith left! Ok?') == [
        'He said "Hi."', "Then e.g. J. Smith left!", "Ok?"]
    assert count_sentences("Pi is 3.14 today. Yes") == 2
    assert count_sentences("") == 0
    assert count_words("It's a well-known fact: 3 cats.") == 8  # It s a well known fact 3 cats


def test_ifeval_input_layout_with_null_kwargs():
    # IFEval's input_data.jsonl: kwargs aligned with ids, unused parameter names present as null
    record = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
              "kwargs": [{"keywords": None, "num_words": None}, {"keywords": ["sun"], "relation": None}]}
    assert check_record(record, "The sun is out.") == [True, True]
    assert check_record(record, "The moon, out.") == [False, False]
    assert ifeval_reward(record, "The sun, out.") == (0.5, False)
    assert ifeval_reward(record, "The sun is out.") == (1.0, True)
    assert ifeval_reward({"prompt": "no constraints"}, "x") == (None, None)


def test_reward_through_the_registry():
    fn = load_reward("ifeval")
    rec = {"id": "r", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}
    assert fn(rec, "<<T>> ok") == (1.0, True)
    assert fn(rec, "no title") == (0.0, False)


@pytest.mark.parametrize(("iid", "kwargs", "match"), [
    ("keywords:nope", {}, "unknown IFEval instruction id 'keywords:nope'"),
    ("keywords:existence", {"keywords": None}, "keywords:existence needs kwargs keywords"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "more than"}, "relation must be one of"),
])
def test_bad_specs_are_input_errors(iid, kwargs, match):
    with pytest.raises(InputError, match=match):
        check(iid, "some text", kwargs)


def test_bad_record_layout():
    with pytest.raises(InputError, match="kwargs must be a list of 2"):
        check_record({"instruction_id_list": ["a:b", "c:d"], "kwargs": [{}]}, "x")


def test_conflicts_are_symmetric_and_respected():
    for a, bs in CONFLICTS.items():
        assert a in bs
        for b in bs:
            assert a in CONFLICTS[b], (a, b)
    rng = random.Random(0)
    for _ in range(200):
        taken, used = [], set()
        for _ in range(3):
            got = sample_instruction(rng, query="Tell me about cats.", taken=taken, used_words=used)
            if got is None:
                break
            iid, kw, text = got
            assert not any(iid in CONFLICTS[t] for t in taken), (iid, taken)
            assert text and text[0].isupper()
            check(iid, "Some response text.", kw)  # the drawn kwargs are complete (no InputError)
            used |= set(kw.get("keywords", ())) | set(kw.get("forbidden_words", ())) | {kw.get("keyword")}
            taken.append(iid)


def test_sampled_repeat_prompt_repeats_the_query():
    rng = random.Random(1)
    iid, kw, _ = sample_instruction(rng, query="Name a fruit.", allowed=["combination:repeat_prompt"])
    assert kw == {"prompt_to_repeat": "Name a fruit."}
    assert check(iid, "Name a fruit. Apple.", kw)
    assert sample_instruction(rng, query="q", taken=["detectable_format:constrained_response"]) is None


def test_rollout_reward_ifeval_end_to_end(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [
        {"id": "a", "prompt": "1+2=", "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
         "kwargs": [{}, {}]},
        {"id": "b", "prompt": "3+4="},
    ]))
    r = subprocess.run([sys.executable, "-m", "cpmtool", "rollout", "--model", "cpm-tiny", "--reward", "ifeval",
                        "--n", "2", "--max-tokens", "8", "--seed", "1", str(src)], capture_output=True, timeout=300,
                       env={**os.environ, "CPMTOOL_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr.decode()
    out = {x["id"]: x for x in map(orjson.loads, r.stdout.splitlines())}
    assert sorted(out) == ["a-0", "a-1", "b-0", "b-1"]
    for k in ("a-0", "a-1"):
        want = [check("punctuation:no_comma", out[k]["completion"]), check("detectable_format:title", out[k]["completion"])]
        assert out[k]["reward"] == sum(want) / 2 and out[k]["correct"] == all(want)
    assert out["b-0"]["reward"] is None and out["b-0"]["correct"] is None
