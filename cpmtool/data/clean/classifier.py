"""fastText-style quality classifier (Ultra-FineWeb): hashed word n-grams -> a linear model.

`train_classifier` fits a logistic-regression classifier on hashed 1..3-gram features of
preprocessed text (scikit-learn's stateless HashingVectorizer + SGDClassifier with log loss),
the same model family as fastText's supervised mode with wordNgrams=3. The model directory
holds `classifier.json` (settings, metrics) and `weights.npz` (the non-zero weights): plain
data, no pickle, readable by any later version.

Preprocessing is Ultra-FineWeb's (preprocess_content.py): collapse 3+ newlines to 2,
lower-case, NFKD without combining marks, split into tokens joined by spaces, escape
newlines/tabs, squeeze spaces. Ultra-FineWeb's tokens are DeepSeek-V2 sub-words; without a
`tokenizer` (a tokenizer.json path) this uses words, punctuation marks and newline runs instead.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cpmtool.errors import ConfigError, InputError, MissingDependencyError

_NEWLINES = re.compile(r"\n{3,}")
_WORDS = re.compile(r"\w+|[^\w\s]|\n+")  # newline runs are tokens, as sub-word vocabularies have them
_SPACES = re.compile(r" +")


@dataclass
class ClassifierConfig:
    """Args:
    n_features: hashed feature space size (2^n_bits).
    word_ngrams: longest word n-gram (fastText's wordNgrams; Ultra-FineWeb used 3).
    epochs: passes over the data.
    alpha: L2 regularisation strength.
    holdout: share of the data held out for the reported metrics.
    seed: shuffling and holdout seed.
    max_chars: only the first this many characters of a document (-1: all).
    tokenizer: path to a tokenizer.json for sub-word tokens (None: words and punctuation).
    """

    n_features: int = 1 << 20
    word_ngrams: int = 3
    epochs: int = 5
    alpha: float = 1e-6
    holdout: float = 0.1
    seed: int = 0
    max_chars: int = 20000
    tokenizer: str | None = None


def preprocess(text: str, tokenize=None) -> str:
    """Ultra-FineWeb's fastText input line for `text` (steps 1-5 of its preprocess_content)."""
    text = _NEWLINES.sub("\n\n", text).lower()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")
    pieces = tokenize(text) if tokenize else _WORDS.findall(text)
    text = " ".join(pieces)
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return _SPACES.sub(" ", text).strip()


def _tokenizer(path: str | None):
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("--tokenizer needs tokenizers (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ConfigError(f"cannot load tokenizer {path}: {e}") from None

    def tokenize(text: str) -> list[str]:
        ids = tok.encode(text, add_special_tokens=False).ids
        return [tok.decode([i]) for i in ids]  # one piece per id, as Ultra-FineWeb decodes them

    return tokenize


def _vectorizer(cfg: ClassifierConfig):
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        raise MissingDependencyError(
            "the quality classifier needs scikit-learn (pip install scikit-learn)"
        ) from None
    return HashingVectorizer(
        n_features=cfg.n_features,
        ngram_range=(1, cfg.word_ngrams),
        token_pattern=r"\S+",  # the preprocessed text is already tokens joined by spaces
        lowercase=False,
        alternate_sign=False,
        norm="l2",
    )


class QualityClassifier:
    """A trained classifier: `score(texts) -> P(good)` for each text."""

    def __init__(self, cfg: ClassifierConfig, coef: np.ndarray, intercept: float, info: dict | None = None):
        self.cfg = cfg
        self.coef = coef.astype(np.float64)  # (n_features,)
        self.intercept = float(intercept)
        self.info = info or {}
        self._vec = _vectorizer(cfg)
        self._tokenize = _tokenizer(cfg.tokenizer)

    def features(self, texts: Iterable[str]):
        m = self.cfg.max_chars
        return self._vec.transform(preprocess(t if m < 0 else t[:m], self._tokenize) for t in texts)

    def score(self, texts: list[str]) -> np.ndarray:
        """P(good) for each text, (N,) float."""
        z = self.features(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        nz = np.flatnonzero(self.coef)
        np.savez_compressed(
            d / "weights.npz",
            index=nz.astype(np.int64),
            value=self.coef[nz].astype(np.float32),
            intercept=np.float64(self.intercept),
        )
        meta = {"format": "cpmtool-quality-classifier/1", "config": asdict(self.cfg), **self.info}
        (d / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> QualityClassifier:
        """Raises ConfigError when `directory` is not a classifier saved by `train-classifier`."""
        d = Path(directory)
        try:
            meta = json.loads((d / "classifier.json").read_text())
            with np.load(d / "weights.npz", allow_pickle=False) as z:
                index, value, intercept = z["index"], z["value"], float(z["intercept"])
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{d}: not a quality classifier ({e}); train one with `cpmtool clean train-classifier`"
            ) from None
        if meta.get("format") != "cpmtool-quality-classifier/1":
            raise ConfigError(f"{d}: unknown classifier format {meta.get('format')!r}")
        cfg = ClassifierConfig(**meta["config"])
        coef = np.zeros(cfg.n_features)
        coef[index] = value
        info = {k: v for k, v in meta.items() if k not in ("format", "config")}
        return cls(cfg, coef, intercept, info)


def _texts(records: Iterable[dict], what: str) -> list[str]:
    out = [r["text"] for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
    if not out:
        raise InputError(f"{what}: no documents with a non-empty `text`")
    return out


def train_classifier(
    pos: Iterable[dict], neg: Iterable[dict], cfg: ClassifierConfig | None = None
) -> QualityClassifier:
    """Fit a classifier on good (`pos`) and bad (`neg`) documents; metrics on a held-out share.

    Raises:
        InputError: either side has no usable documents.
    """
    cfg = cfg or ClassifierConfig()
    try:
        from sklearn.linear_model import SGDClassifier
    except ImportError:
        raise MissingDependencyError(
            "the quality classifier needs scikit-learn (pip install scikit-learn)"
        ) from None
    good, bad = _texts(pos, "--pos"), _texts(neg, "--neg")
    texts = good + bad
    y = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(texts))
    n_hold = int(len(texts) * cfg.holdout) if len(texts) >= 20 else 0
    hold, train = perm[:n_hold], perm[n_hold:]
    probe = QualityClassifier(cfg, np.zeros(cfg.n_features), 0.0)
    x = probe.features(texts)
    model = SGDClassifier(
        loss="log_loss",
        alpha=cfg.alpha,
        max_iter=cfg.epochs,
        tol=None,
        random_state=cfg.seed,
        class_weight="balanced",
    )
    model.fit(x[train], y[train])
    clf = QualityClassifier(cfg, model.coef_[0], model.intercept_[0])
    info = {"n_pos": len(good), "n_neg": len(bad), "n_train": int(len(train)), "n_holdout": int(n_hold)}
    if n_hold:
        p = 1.0 / (1.0 + np.exp(-(x[hold] @ clf.coef + clf.intercept)))
        info["holdout"] = _metrics(y[hold], p)
    clf.info = info
    return clf


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    pred = p >= 0.5
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "accuracy": round(float((pred == (y == 1)).mean()), 4),
        "precision": round(prec, 4),
        "recall": round(rec, 4),
        "f1": round(f1, 4),
    }


class QualityFilter:
    """Adds `quality` = P(good); reason `low_quality` below the threshold."""

    name = "quality"

    def __init__(self, classifier: QualityClassifier, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
            raise ConfigError(f"--threshold must be in [0, 1], not {threshold}")
        self.clf = classifier
        self.threshold = threshold

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        q = float(self.clf.score([record["text"]])[0])
        record["quality"] = round(q, 6)
        return True if q >= self.threshold else (False, "low_quality")
