"""Exact and MinHash dedup: literal cases, the first of a cluster kept, and sharded == unsharded."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cpmtool.data.clean import apply_drops, clean, merge
from cpmtool.data.clean.dedup import ExactDedup, ExactDedupConfig, MinHashConfig, MinHashDedup, MinHasher

SAMPLE = Path(__file__).parents[3] / ".." / "shared" / "data" / "web_docs_sample.jsonl"
BASE = (
    "The history of the town goes back to a small market that was held near the river every week. "
    "Farmers came with their goods and traders from the coast brought salt, cloth and news from far away. "
    "Over the years the market grew into a busy place with houses, a church, two inns and a school. "
    "Today the old square is still used for a weekly fair, and visitors like to walk along the narrow "
    "streets that have kept much of their character since the middle ages."
)


def near(text, k=1):
    w = text.split()
    for i in range(k):
        w[7 + 13 * i] = "changed"
    return " ".join(w)


def test_exact_dedup_ignores_whitespace_keeps_first_and_names_it():
    d = ExactDedup()
    a, b, c = (
        {"id": "a", "text": "Same  text\nhere"},
        {"id": "b", "text": "Same text here"},
        {"id": "c", "text": "Other"},
    )
    assert d(a) is True and d(c) is True
    assert d(b) == (False, "duplicate") and b["dup_of"] == "a"
    assert ExactDedup(ExactDedupConfig(whitespace=False))({"id": "x", "text": "t"}) is True
    assert d.report()["clusters_by_size"] == {1: 1, 2: 1}


def test_minhash_drops_near_duplicates_not_different_or_short_texts():
    d = MinHashDedup()
    assert d({"id": "a", "text": BASE}) is True
    assert d({"id": "b", "text": near(BASE)}) == (False, "near_duplicate")
    other = {"id": "c", "text": " ".join(reversed(BASE.split()))}
    assert d(other) is True
    # fewer than 5 words: no shingle, no signature, never a duplicate (as datatrove)
    assert d({"id": "s1", "text": "four words only here"}) is True
    assert d({"id": "s2", "text": "four words only here"}) is True


def test_minhash_cluster_is_the_first_documents_even_through_a_chain():
    # b is near a; c is near b but further from a: both belong to a's cluster
    d = MinHashDedup()
    b_text, c_text = near(BASE, 1), near(BASE, 2)
    recs = [{"id": "a", "text": BASE}, {"id": "b", "text": b_text}, {"id": "c", "text": c_text}]
    assert [d(r) for r in recs] == [True, (False, "near_duplicate"), (False, "near_duplicate")]
    assert recs[1]["dup_of"] == "a" and recs[2]["dup_of"] == "a"
    assert d.report()["clusters_by_size"] == {3: 1}


def test_minhash_signature_shape_seed_and_formula():
    h = MinHasher(MinHashConfig(num_buckets=3, hashes_per_bucket=2, seed=7))
    sig = h.signature(BASE)
    assert sig.shape == (3, 2) and sig.dtype == np.uint64
    assert (sig < np.uint64((1 << 61) - 1)).all()
    # the datatrove formula by hand for one hash function: min over shingles of (h*a + b) mod p (uint64 wrap)
    gen = np.random.RandomState(7)
    a = gen.randint(1, (1 << 61) - 1, dtype=np.uint64, size=(1, 6))
    b = gen.randint(0, (1 << 61) - 1, dtype=np.uint64, size=(1, 6))
    sh = h.shingles(BASE)
    p, a0, b0 = (1 << 61) - 1, int(a[0, 0]), int(b[0, 0])
    assert int(sig[0, 0]) == min(((int(x) * a0 + b0) & ((1 << 64) - 1)) % p for x in sh[:, 0])
    assert h.signature("too short") is None
    assert not np.array_equal(MinHasher(MinHashConfig(seed=2)).band_keys(BASE), MinHasher().band_keys(BASE))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four input files: the web sample in three parts, plus exact and near copies across files."""
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (shared/ must sit beside the repository)")
    docs = [json.loads(line) for line in SAMPLE.open()]
    d = tmp_path_factory.mktemp("corpus")
    parts = [docs[:40], docs[100:140], docs[200:240]]
    extra = []
    for k in (3, 10, 110, 220, 239):
        extra.append({"text": docs[k]["text"]})  # exact copy, in a later file
        extra.append({"text": near(docs[k]["text"], 2)})  # near copy
    parts[1] = parts[1] + [
        {"text": docs[5]["text"]},
        {"text": near(docs[250]["text"])},
    ]  # a later file's twin
    parts.append(extra)
    paths = []
    for i, part in enumerate(parts):
        p = d / f"part{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(str(p))
    return d, paths


STAGES = "normalise,gopher_quality,exact_dedup,minhash"


def _ids(path):
    return Counter(json.loads(line)["id"] for line in Path(path).read_text().splitlines())


def test_sharded_dedup_equals_unsharded(corpus):
    d, paths = corpus
    stats = clean(
        paths, d / "all.jsonl", stages=STAGES, rejects=d / "all.rej.jsonl", stats_path=d / "all.json"
    )
    assert stats.n_in == stats.n_out + stats.n_rejected
    reasons = json.loads((d / "all.json").read_text())["rejected_by_reason"]
    assert reasons["exact_dedup:duplicate"] >= 6 and reasons["minhash:near_duplicate"] >= 5

    n = 3
    for i in range(n):
        clean(paths, d / f"kept{i}.jsonl", stages=STAGES, shard=f"{i}/{n}", signatures=d / "sigs")
    report = merge(d / "sigs", d / "drops.jsonl")
    final = Counter()
    dedup_reasons = Counter()
    for i in range(n):
        st = apply_drops(
            d / f"kept{i}.jsonl",
            d / f"final{i}.jsonl",
            drops=d / "drops.jsonl",
            shard=f"{i}/{n}",
            rejects=d / f"rej{i}.jsonl",
        )
        dedup_reasons.update(st.rejected)
        final += _ids(d / f"final{i}.jsonl")
    assert final == _ids(d / "all.jsonl")
    assert dedup_reasons["exact_dedup:duplicate"] == reasons["exact_dedup:duplicate"]
    assert dedup_reasons["minhash:near_duplicate"] == reasons["minhash:near_duplicate"]
    assert report["stages"]["minhash"]["dropped"] == reasons["minhash:near_duplicate"]
    # the dropped copies name the document they duplicate
    rej = [json.loads(x) for i in range(n) for x in (d / f"rej{i}.jsonl").read_text().splitlines()]
    assert all(r["dup_of"] and r["reject_stage"] in ("exact_dedup", "minhash") for r in rej)


def test_merge_refuses_missing_shards_and_wrong_outputs(corpus, tmp_path):
    from cpmtool.errors import InputError

    d, paths = corpus
    clean(paths, tmp_path / "k0.jsonl", stages="exact_dedup", shard="0/2", signatures=tmp_path / "sigs")
    with pytest.raises(InputError, match=r"shards \[1\] of 2 are missing"):
        merge(tmp_path / "sigs", tmp_path / "drops.jsonl")
    with pytest.raises(InputError, match="no shard"):
        merge(tmp_path / "empty", tmp_path / "drops.jsonl")
    clean(paths, tmp_path / "k1.jsonl", stages="exact_dedup", shard="1/2", signatures=tmp_path / "sigs")
    merge(tmp_path / "sigs", tmp_path / "drops.jsonl")
    drops = [json.loads(x) for x in (tmp_path / "drops.jsonl").read_text().splitlines()]
    wrong = 1 - drops[0]["shard"]  # apply shard A's drops to shard B's output
    with pytest.raises(InputError):
        apply_drops(
            tmp_path / f"k{wrong}.jsonl",
            tmp_path / "f.jsonl",
            drops=tmp_path / "drops.jsonl",
            shard=f"{drops[0]['shard']}/2",
        )


def test_signatures_need_dedup_stages_last(corpus, tmp_path):
    from cpmtool.errors import ConfigError

    _, paths = corpus
    with pytest.raises(ConfigError, match="must come last"):
        clean(paths, tmp_path / "o.jsonl", stages="minhash,gopher_quality", signatures=tmp_path / "s")
    with pytest.raises(ConfigError, match="needs a dedup stage"):
        clean(paths, tmp_path / "o.jsonl", stages="gopher_quality", signatures=tmp_path / "s")
