"""The quality classifier: Ultra-FineWeb preprocessing, train -> save -> load -> score, the filter stage."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cpmtool.data.clean import clean, train
from cpmtool.data.clean.classifier import ClassifierConfig, QualityClassifier, QualityFilter, preprocess
from cpmtool.errors import ConfigError, InputError

SAMPLE = Path(__file__).parents[3] / ".." / "shared" / "data" / "web_docs_sample.jsonl"


def test_preprocess_is_ultra_fineweb_steps():
    text = "Café  RÉSUMÉ,\n\n\n\nnew\tline"
    # 3+ newlines -> 2, lower-case, NFKD without marks, tokens joined by spaces, \n and \t escaped
    assert preprocess(text) == "cafe resume , \\n\\n new line"
    assert preprocess(text, tokenize=lambda t: t.split(" ")) == "cafe resume,\\n\\nnew\\tline"


def _junk(rng, vocab, n):
    out = []
    for _ in range(n):
        words = rng.choices(vocab, k=rng.randint(40, 120))
        out.append({"text": "BUY NOW!!! " + " ".join(words) + " click here | login | cart | $$$ 50% OFF"})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (shared/ must sit beside the repository)")
    d = tmp_path_factory.mktemp("clf")
    docs = [json.loads(line) for line in SAMPLE.open()]
    rng = random.Random(0)
    vocab = sorted({w for r in docs for w in r["text"].split()})
    pos, neg = docs[:150], _junk(rng, vocab, 150)
    (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pos))
    (d / "neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in neg))
    held = docs[250:] + _junk(random.Random(1), vocab, 50)
    (d / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return d


def test_train_save_load_score_round_trip(data, tmp_path):
    info = train(data / "pos.jsonl", data / "neg.jsonl", tmp_path / "clf", n_features=1 << 16)
    assert info["n_pos"] == 150 and info["n_neg"] == 150 and info["holdout"]["f1"] > 0.9
    clf = QualityClassifier.load(tmp_path / "clf")
    held = [json.loads(x)["text"] for x in (data / "held.jsonl").read_text().splitlines()]
    scores = clf.score(held)
    assert scores.shape == (100,) and ((scores >= 0) & (scores <= 1)).all()
    assert scores[:50].mean() > 0.8 and scores[50:].mean() < 0.2
    again = QualityClassifier.load(tmp_path / "clf").score(held)
    np.testing.assert_allclose(scores, again, rtol=0, atol=1e-6)  # weights are stored as float32
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["format"] == "cpmtool-quality-classifier/1" and meta["config"]["word_ngrams"] == 3


def test_classifier_stage_adds_quality_and_filters(data, tmp_path):
    train(data / "pos.jsonl", data / "neg.jsonl", tmp_path / "clf", n_features=1 << 16)
    stats = clean(
        data / "held.jsonl",
        tmp_path / "o.jsonl",
        stages="none",
        classifier=tmp_path / "clf",
        threshold=0.5,
        rejects=tmp_path / "r.jsonl",
    )
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    rej = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(r["quality"] >= 0.5 for r in out) and all(r["quality"] < 0.5 for r in rej)
    assert stats.rejected["quality:low_quality"] == len(rej) >= 45 and len(out) >= 45


def test_classifier_errors(data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(InputError, match="--neg"):
        train(data / "pos.jsonl", empty, tmp_path / "clf")
    with pytest.raises(ConfigError, match="not a quality classifier"):
        QualityClassifier.load(tmp_path)
    with pytest.raises(ConfigError, match="threshold"):
        QualityFilter(QualityClassifier(ClassifierConfig(n_features=8), np.zeros(8), 0.0), threshold=1.5)
    with pytest.raises(ConfigError, match="unknown setting"):
        train(data / "pos.jsonl", data / "neg.jsonl", tmp_path / "c", ngrams=2)
