"""Language identification with py3langid (langid.py's model, shipped inside the package).

Adds `lang` and `lang_score` (the probability of the top language) to every document it sees.
datatrove uses fastText's lid.176 here, which must be downloaded; py3langid needs nothing
fetched, so the same pipeline runs offline. Scores are normalised probabilities, as lid.176's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from cpmtool.errors import ConfigError, MissingDependencyError


@dataclass
class LangConfig:
    """Args:
    languages: ISO 639-1 codes to keep (an empty list keeps any confidently identified language).
    threshold: keep when a wanted language scores above this (datatrove's 0.65).
    max_chars: identify on the first this many characters (-1: all); long pages cost time
      and the opening is enough to tell the language.
    """

    languages: list[str] = field(default_factory=lambda: ["en"])
    threshold: float = 0.65
    max_chars: int = 5000


@lru_cache(1)
def _identifier():
    # loading the model takes a second or two; every LanguageId in a process shares one
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise MissingDependencyError(
            "language identification needs py3langid (pip install py3langid)"
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageId:
    """Reasons: `wrong_language` (the top language is not wanted), `low_language_score`."""

    name = "lang"

    def __init__(self, cfg: LangConfig | None = None):
        self.cfg = cfg or LangConfig()
        self._id = _identifier()
        unknown = sorted(set(self.cfg.languages) - set(self._id.nb_classes))
        if unknown:
            raise ConfigError(
                f"lang: unknown language codes {unknown} (py3langid knows ISO 639-1 codes like en, zh, de)"
            )
        self._wanted = frozenset(self.cfg.languages)

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        text = record["text"]
        if self.cfg.max_chars >= 0:
            text = text[: self.cfg.max_chars]
        ranked = self._id.rank(text.replace("\n", " "))
        top, top_score = ranked[0]
        record["lang"] = top
        record["lang_score"] = round(float(top_score), 4)
        if not self._wanted:
            return True if top_score > self.cfg.threshold else (False, "low_language_score")
        best = max((float(s) for lang, s in ranked if lang in self._wanted), default=0.0)
        if best > self.cfg.threshold:
            return True
        return False, "wrong_language" if top not in self._wanted else "low_language_score"
