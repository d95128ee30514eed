"""The word splitter: spaCy's English tokenization without spaCy; sentence counts; simplify_text."""

import importlib.util
import json
from pathlib import Path

import pytest

from cpmtool.data.clean.words import english, simplify_text, split_words

SAMPLE = Path(__file__).parents[3] / ".." / "shared" / "data" / "web_docs_sample.jsonl"


def test_split_matches_spacy_on_literal_text():
    # expected tokens are what spacy.blank("en") gives (checked with spaCy 3.8)
    text = (
        'Don\'t stop, U.S. e.g. well-known $10.50 (hello) "quoted" 5km. http://example.com/a?b=1 '
        "I'm gonna go... :) and/or C++"
    )
    assert split_words(text) == [
        "Do", "n't", "stop", ",", "U.S.", "e.g.", "well", "-", "known", "$", "10.50", "(", "hello", ")", '"',
        "quoted", '"', "5", "km", ".", "http://example.com/a?b=1", "I", "'m", "gon", "na", "go", "...", ":)",
        "and/or", "C++",
    ]  # fmt: skip
    assert split_words("The cat's toy; it costs 3.5%! Really?! Yes.") == [
        "The", "cat", "'s", "toy", ";", "it", "costs", "3.5", "%", "!", "Really", "?", "!", "Yes", ".",
    ]  # fmt: skip
    assert split_words(" \n\t ") == []


def test_sentence_counts_follow_spacy_sentencizer():
    ws = english()
    assert ws.count_sentences("Hello there. How are you? Fine!") == 3
    assert ws.count_sentences("Dr. Smith arrived. He sat.") == 2
    assert ws.count_sentences('One... two. "Three." Four') == 3
    # a whitespace run other than one space is a token of its own and can open a sentence
    assert ws.count_sentences('End of it.\t"') == 2
    assert ws.count_sentences("") == 0


def test_simplify_text_like_datatrove():
    assert (
        simplify_text("  Héllo, WORLD!  It's 3.14 and 2,000\n\tpeople.") == "hello world it s 0 and 0 people"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("spacy") is None, reason="spaCy not installed (the parity check needs it)"
)
def test_identical_to_spacy_on_the_web_sample():
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (shared/ must sit beside the repository)")
    import spacy

    nlp = spacy.blank("en")
    texts = [json.loads(line)["text"] for line in SAMPLE.open()][:100]
    for i, text in enumerate(texts):
        ref = [t.text.strip() for t in nlp.tokenizer(text) if t.text.strip()]
        assert split_words(text) == ref, i
