"""The whole pipeline on the shared web sample; nothing is lost; stage choice, YAML, overrides."""

import json
from pathlib import Path

import pytest

from cpmtool.data.clean import clean
from cpmtool.errors import ConfigError

SAMPLE = Path(__file__).parents[3] / ".." / "shared" / "data" / "web_docs_sample.jsonl"

# datatrove v0.10 gives exactly these counts on the same 300 documents with the same four filters
# (GopherRepetition, GopherQuality, C4Quality, FineWebQuality at their defaults): 215 kept.
EXPECTED_REJECTS = {
    "c4:too_few_sentences": 21,
    "gopher_quality:gopher_below_alpha_threshold": 26,
    "gopher_quality:gopher_short_doc": 22,
    "gopher_quality:gopher_too_many_ellipsis": 1,
    "gopher_repetition:duplicated_10_n_grams": 1,
    "gopher_repetition:duplicated_5_n_grams": 4,
    "gopher_repetition:duplicated_6_n_grams": 1,
    "gopher_repetition:top_2_gram": 4,
    "gopher_repetition:top_3_gram": 2,
    "gopher_repetition:top_4_gram": 3,
}


@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (shared/ must sit beside the repository)")
    return SAMPLE


@pytest.fixture(scope="module")
def default_run(sample, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    head = d / "head.jsonl"  # the first 120 documents keep this test quick
    head.write_text("".join(sample.read_text().splitlines(keepends=True)[:120]))
    stats = clean(head, d / "out.jsonl", rejects=d / "rej.jsonl", stats_path=d / "stats.json")
    return d, stats


def test_rules_on_the_web_sample_match_datatrove_counts(sample, tmp_path):
    stats = clean(
        sample,
        tmp_path / "o.jsonl",
        stages="normalise,gopher_repetition,gopher_quality,c4,fineweb,exact_dedup,minhash",
    )
    assert dict(stats.rejected) == EXPECTED_REJECTS
    assert stats.n_out == 215


def test_default_pipeline_loses_nothing_and_explains_every_drop(default_run):
    d, stats = default_run
    out = [json.loads(x) for x in (d / "out.jsonl").read_text().splitlines()]
    rej = [json.loads(x) for x in (d / "rej.jsonl").read_text().splitlines()]
    assert stats.n_in == 120 == len(out) + len(rej)
    assert len({r["reject_line"] for r in rej} | {None}) == len(rej) + 1  # each input line at most once
    for r in rej:
        assert r["reject_reason"] == f"{r['reject_stage']}:{r['reject_rule']}"
        assert r["reject_source"].endswith("head.jsonl") and 1 <= r["reject_line"] <= 120
    assert all(r["lang"] == "en" and "id" in r and r["text"] for r in out)
    s = json.loads((d / "stats.json").read_text())
    assert s["in"] == 120 and s["out"] == len(out) and s["complete"]
    assert list(s["stages"]) == [
        "normalise",
        "lang",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "exact_dedup",
        "minhash",
    ]
    for name, c in s["stages"].items():
        assert c["in"] == c["out"] + sum(c["dropped"].values()), name
    assert s["stages"]["minhash"]["clusters_by_size"] == {"1": len(out)}  # C4 has no near-duplicates here
    assert sum(s["rejected_by_reason"].values()) == len(rej)


def test_yaml_pipeline_and_overrides(sample, tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "# cpmtool clean x.jsonl --pipeline p.yaml\nstages:\n  - normalise\n"
        "  - gopher_quality: {min_doc_words: 400}\n"
    )
    stats = clean(sample, tmp_path / "o.jsonl", pipeline=y)
    long_only = stats.n_out
    assert 0 < long_only < 150
    assert set(stats.rejected) <= {
        "gopher_quality:gopher_short_doc",
        "gopher_quality:gopher_below_alpha_threshold",
    }
    assert stats.rejected["gopher_quality:gopher_short_doc"] > 150
    stats2 = clean(sample, tmp_path / "o2.jsonl", pipeline=y, overrides=["gopher_quality.min_doc_words=50"])
    assert stats2.n_out > long_only


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"stages": "normalise,nosuch"}, "unknown stage 'nosuch'"),
        (
            {"stages": "gopher_quality", "overrides": ["gopher_quality.min_words=3"]},
            "unknown setting 'min_words'",
        ),
        ({"stages": "gopher_quality", "overrides": ["gopher_quality.min_doc_words=lots"]}, "expected"),
        ({"stages": "c4", "overrides": ["minhash.seed=2"]}, "not in the pipeline"),
        ({"stages": "c4", "overrides": ["c4"]}, "STAGE.KEY=VALUE"),
        ({"stages": "c4", "shard": "3/2"}, "--shard"),
        ({"stages": "c4", "pipeline": "x.yaml"}, "either --stages or --pipeline"),
    ],
)
def test_config_errors_are_one_clear_message(sample, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        clean(sample, tmp_path / "o.jsonl", **kw)


def test_records_without_text_and_extra_fields(tmp_path):
    src = tmp_path / "in.jsonl"
    good = "The river runs past the old mill and on to the sea. " * 20
    src.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "a", "text": good, "url": "https://example.org/a", "meta": {"k": 1}},
                {"id": "b", "body": "no text field"},
                {"id": "c", "text": ["not", "a", "string"]},
            ]
        )
        + "\n"
    )
    stats = clean(src, tmp_path / "o.jsonl", stages="normalise,gopher_quality", rejects=tmp_path / "r.jsonl")
    assert dict(stats.rejected) == {"normalise:no_text": 2}
    out = json.loads((tmp_path / "o.jsonl").read_text())
    assert out["meta"] == {"k": 1} and out["url"] == "https://example.org/a"  # unknown fields kept
    # without normalise, a missing text is still a counted reject, not a crash
    stats = clean(src, tmp_path / "o2.jsonl", stages="gopher_quality")
    assert dict(stats.rejected) == {"gopher_quality:no_text": 2}


def test_nothing_is_lost_property(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    line = st.one_of(
        st.builds(lambda t: json.dumps({"text": t}).encode(), st.text(max_size=300)),
        st.builds(
            lambda t: json.dumps({"text": t, "id": "same"}).encode(), st.sampled_from(["a b c", "a  b c"])
        ),
        st.sampled_from([b"[1]", b'"str"', b"{bad", b"\xff\xfe{}", b"null", b'{"text": null}']),
    )

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(line, max_size=12))
    def check(lines):
        d = tmp_path_factory.mktemp("prop")
        src = d / "in.jsonl"
        src.write_bytes(b"\n".join(lines) + b"\n")
        stats = clean(
            src, d / "o.jsonl", stages="normalise,gopher_quality,exact_dedup,minhash", rejects=d / "r.jsonl"
        )
        n_out = len((d / "o.jsonl").read_bytes().splitlines())
        n_rej = len((d / "r.jsonl").read_bytes().splitlines())
        assert stats.n_in == len(lines) == n_out + n_rej
        assert stats.n_out == n_out and stats.n_rejected == n_rej

    check()
