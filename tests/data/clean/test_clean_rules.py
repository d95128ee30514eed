"""Each cleaning rule on small literal texts, with its exact reason code (datatrove's names).

Where datatrove (and spaCy) are installed, the same literal cases are also run through
datatrove's own filters, which must give the same decision and reason.
"""

import importlib.util

import pytest

from cpmtool.data.clean.c4 import C4Config, C4Quality
from cpmtool.data.clean.fineweb import FineWebConfig, FineWebQuality
from cpmtool.data.clean.gopher import (
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)
from cpmtool.data.clean.lang import LangConfig, LanguageId
from cpmtool.data.clean.normalise import Normalise, NormaliseConfig, normalise_text
from cpmtool.data.clean.url import UrlConfig, UrlFilter

HAVE_DATATROVE = (
    importlib.util.find_spec("datatrove") is not None and importlib.util.find_spec("spacy") is not None
)

# 60+ ordinary words: passes every Gopher quality rule.
GOOD = (
    "The history of the town goes back to a small market that was held near the river. "
    "Farmers came with their goods and traders from the coast brought salt and cloth. "
    "Over the years the market grew into a busy place with houses, a church and a school. "
    "Today the old square is still used for a weekly fair, and visitors like to walk along "
    "the narrow streets that have kept much of their character."
)


def words(n, vocab=("river", "market", "stone", "bridge", "garden", "window", "morning", "letter")):
    return " ".join(vocab[i % len(vocab)] for i in range(n))


QUALITY_CASES = [
    ("short", "The cat sat on the mat with the dog.", {}, "gopher_short_doc"),
    ("long", GOOD, {"max_doc_words": 20}, "gopher_long_doc"),
    ("below_avg", " ".join(["it is to be of an"] * 10) + " the and", {}, "gopher_below_avg_threshold"),
    (
        "above_avg",
        " ".join(["internationalization extraordinarily"] * 30) + " the and",
        {},
        "gopher_above_avg_threshold",
    ),
    ("hashes", GOOD + " " + " ".join(["#tag"] * 12), {}, "gopher_too_many_hashes"),
    ("ellipsis", GOOD + " " + " ".join(["wait..."] * 12), {}, "gopher_too_many_ellipsis"),
    ("bullets", "\n".join("- " + words(8) + " the and" for _ in range(10)), {}, "gopher_too_many_bullets"),
    (
        "end_ellipsis",
        "\n".join([words(12) + " the and ..."] * 4 + [words(14) + " the and."] * 6),
        {},
        "gopher_too_many_end_ellipsis",
    ),
    ("alpha", GOOD + " " + " ".join(str(i) for i in range(40)), {}, "gopher_below_alpha_threshold"),
    ("stop_words", words(60), {}, "gopher_enough_stop_words"),
]


@pytest.mark.parametrize("name,text,cfg,reason", QUALITY_CASES, ids=[c[0] for c in QUALITY_CASES])
def test_gopher_quality_reasons(name, text, cfg, reason):
    assert GopherQuality(GopherQualityConfig(**cfg)).check(text) == (False, reason)


def test_gopher_quality_keeps_good_text_and_rules_can_be_switched_off():
    assert GopherQuality().check(GOOD) is True
    assert GopherQuality(GopherQualityConfig(min_stop_words=None)).check(words(60)) is True


PARA = "This paragraph is about the weather in spring and the flowers that grow in the park."
REPETITION_CASES = [
    ("empty", "", {}, "empty"),
    ("dup_para", "\n\n".join([PARA, PARA, "Another short one here.", PARA]), {}, "dup_para_frac"),
    (
        "dup_para_char",
        "\n\n".join([PARA * 3, PARA * 3] + [f"Unique paragraph number {i}." for i in range(8)]),
        {},
        "dup_para_char_frac",
    ),
    (
        "dup_line",
        "\n".join([PARA, PARA, PARA, "One more line of text."]),
        {"dup_para_frac": None, "dup_para_char_frac": None},
        "dup_line_frac",
    ),
    (
        "dup_line_char",
        "\n".join([PARA * 3, PARA * 3] + [f"Unique line number {i}." for i in range(8)]),
        {"dup_para_frac": None, "dup_para_char_frac": None},
        "dup_line_char_frac",
    ),
    ("top_2", " ".join(["big cat"] * 30 + [words(30)]), {}, "top_2_gram"),
    (
        "dup_5",
        " ".join([f"alpha beta gamma delta epsilon w{i}" for i in range(12)] + [words(40)]),
        {"top_n_grams": []},
        "duplicated_5_n_grams",
    ),
]


@pytest.mark.parametrize("name,text,cfg,reason", REPETITION_CASES, ids=[c[0] for c in REPETITION_CASES])
def test_gopher_repetition_reasons(name, text, cfg, reason):
    assert GopherRepetition(GopherRepetitionConfig(**cfg)).check(text) == (False, reason)


def test_gopher_repetition_keeps_good_text():
    assert GopherRepetition().check(GOOD) is True


SENT = "This line is a complete sentence."
C4_CASES = [
    ("lorem", "\n".join([SENT] * 5 + ["Lorem ipsum dolor sit amet."]), {}, "lorem_ipsum"),
    ("curly", "\n".join([SENT] * 5 + ["Use the {braces} in code."]), {}, "curly_bracket"),
    ("few_sentences", "\n".join([SENT] * 4), {}, "too_few_sentences"),
    (
        "lines_dropped",
        "\n".join(
            [SENT] * 4
            + [
                "no terminal punctuation here",
                "Too short.",
                "Enable javascript to see this.",
                "Read our privacy policy now.",
            ]
        ),
        {},
        "too_few_sentences",
    ),
]


@pytest.mark.parametrize("name,text,cfg,reason", C4_CASES, ids=[c[0] for c in C4_CASES])
def test_c4_reasons(name, text, cfg, reason):
    assert C4Quality(C4Config(**cfg)).check(text) == (False, reason)


def test_c4_rewrites_text_to_its_kept_lines():
    text = "\n".join(
        [
            "  First sentence here. Second one here.  ",
            "a line without an end",
            "Cite this [1] well.",
            "Three more words. And more. Even more here.",
            "Click to enable JavaScript please.",
        ]
    )
    rec = {"text": text}
    assert C4Quality()(rec) is True
    assert (
        rec["text"]
        == "First sentence here. Second one here.\nCite this  well.\nThree more words. And more. Even more here."
    )
    # sentences are spaCy's Sentencizer's: "Hi. There." is 2, so 2 + 1 + 3 = 6 >= 5
    assert C4Quality(C4Config(min_num_sentences=7)).check(text) == (False, "too_few_sentences")


FINEWEB_CASES = [
    ("empty", "\n \n", {}, "empty"),
    (
        "punct",
        "\n".join(["a line without a stop but with words"] * 9 + ["One line ends."]),
        {},
        "line_punct_ratio",
    ),
    (
        "short",
        "\n".join(["Short line."] * 8 + ["This is a much longer line that goes on and on."] * 2),
        {},
        "short_line_ratio",
    ),
    (
        "char_dup",
        "\n".join(
            [SENT + " It continues for a while longer.", SENT + " It continues for a while longer."]
            + [f"Line {i} is different from the rest of them all." for i in range(20)]
        ),
        {},
        "char_dup_ratio",
    ),
    ("list", "\n".join(f"Item {i}." for i in range(30)), {"short_line_thr": 1.0}, "list_ratio"),
]


@pytest.mark.parametrize("name,text,cfg,reason", FINEWEB_CASES, ids=[c[0] for c in FINEWEB_CASES])
def test_fineweb_reasons(name, text, cfg, reason):
    assert FineWebQuality(FineWebConfig(**cfg)).check(text) == (False, reason)


def test_fineweb_keeps_prose():
    assert FineWebQuality().check(GOOD) is True


@pytest.mark.skipif(
    not HAVE_DATATROVE, reason="datatrove and spaCy not installed (pip install 'cpmtool[datatrove]')"
)
def test_literal_cases_match_datatrove():
    # the same inputs through datatrove's filters: same decision, same reason code
    tables = [
        ("GopherQualityFilter", QUALITY_CASES),
        ("GopherRepetitionFilter", REPETITION_CASES),
        ("C4QualityFilter", C4_CASES),
        ("FineWebQualityFilter", FINEWEB_CASES),
    ]
    for cls_name, cases in tables:
        for name, text, cfg, reason in cases:
            assert _datatrove(cls_name, cfg, text) == (False, reason), (cls_name, name)
    assert _datatrove("GopherQualityFilter", {}, GOOD) is True
    assert _datatrove("FineWebQualityFilter", {}, GOOD) is True


def _datatrove(cls_name, cfg, text):
    from datatrove.data import Document
    from datatrove.pipeline import filters

    f = getattr(filters, cls_name)(**cfg)
    return f.filter(Document(text=text, id="x"))


# ---- normalise, lang, url -----------------------------------------------------------------


def test_normalise_nfc_controls_spaces_blank_lines():
    raw = "Cafe\u0301 ok\u00a0here\x07\u200b  \r\n\r\n\r\n\r\nnext line\t \n"
    assert normalise_text(raw, NormaliseConfig()) == "Caf\u00e9 ok here\n\nnext line"
    assert normalise_text("a  b", NormaliseConfig(collapse_spaces=True)) == "a b"
    assert normalise_text("a\n\n\n\nb", NormaliseConfig(max_blank_lines=-1)) == "a\n\n\n\nb"


def test_normalise_reasons():
    n = Normalise()
    assert n({"id": 1}) == (False, "no_text")
    assert n({"text": 5}) == (False, "no_text")
    assert n({"text": " \u200b\x00 \n"}) == (False, "empty")
    rec = {"text": " x "}
    assert n(rec) is True and rec["text"] == "x"


def test_lang_reasons_and_fields():
    lid = LanguageId()
    rec = {"text": GOOD}
    assert lid(rec) is True
    assert rec["lang"] == "en" and rec["lang_score"] > 0.9
    german = {
        "text": "Die Geschichte der Stadt reicht zurück bis zu einem kleinen Markt am Fluss, "
        "auf dem Bauern ihre Waren verkauften und Händler Salz und Stoffe brachten."
    }
    assert lid(german) == (False, "wrong_language")
    assert german["lang"] == "de"
    assert LanguageId(LangConfig(languages=["de", "en"]))(dict(german)) is True
    assert LanguageId(LangConfig(threshold=1.0))({"text": GOOD}) == (False, "low_language_score")
    assert LanguageId(LangConfig(languages=[], threshold=1.0))({"text": GOOD}) == (
        False,
        "low_language_score",
    )
    assert LanguageId(LangConfig(languages=[]))(dict(german)) is True


def test_lang_rejects_unknown_codes():
    from cpmtool.errors import ConfigError

    with pytest.raises(ConfigError, match="xx"):
        LanguageId(LangConfig(languages=["xx"]))


def test_url_reasons(tmp_path):
    domains = tmp_path / "domains.txt"
    domains.write_text("# blocked\nbad-site.com\nsub.example.org\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("http://fine.com/exact-page\n")
    f = UrlFilter(UrlConfig(domains=[str(domains)], urls=[str(urls)], missing_url="drop"))
    assert f.check("https://www.bad-site.com/page") == (False, "domain")
    assert f.check("https://sub.example.org/x") == (False, "subdomain")
    assert f.check("https://other.example.org/x") is True
    assert f.check("http://fine.com/exact-page") == (False, "url")
    assert f.check("http://fine.com/porn/page") == (False, "hard_blacklisted")
    assert f.check("http://fine.com/sexy-lingerie") == (False, "soft_blacklisted")
    assert f.check("http://fine.com/pornhubvideos") == (False, "blacklisted_subword")
    assert f.check("https://en.wikipedia.org/wiki/River") is True
    assert f({"text": "t"}) == (False, "no_url")
    assert UrlFilter()({"text": "t"}) is True


def test_url_matches_datatrove_word_rules():
    if not HAVE_DATATROVE or importlib.util.find_spec("tldextract") is None:
        pytest.skip("datatrove, spaCy or tldextract not installed")
    from datatrove.data import Document
    from datatrove.pipeline.filters import URLFilter

    from cpmtool.data.clean.url import _ASSETS

    lists = {
        k: (_ASSETS / f"{k}.txt").read_text().splitlines()
        for k in ("banned_words", "banned_subwords", "soft_banned_words")
    }
    dt = URLFilter(use_integrated_lists=False, extra_domains=["bad-site.com"], **lists)
    ours = UrlFilter(UrlConfig(extra_domains=["bad-site.com"]))
    for url in [
        "https://www.bad-site.com/a",
        "http://fine.com/porn/page",
        "http://fine.com/sexy-lingerie",
        "http://fine.com/pornhubvideos",
        "https://en.wikipedia.org/wiki/River",
        "http://a.b.c.co.uk/xxx",
    ]:
        assert ours.check(url) == dt.filter(Document(text="t", id="1", metadata={"url": url})), url
