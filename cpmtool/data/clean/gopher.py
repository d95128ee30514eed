"""Gopher quality and repetition rules (Rae et al. 2021, Table A1), as datatrove v0.10 computes them.

Thresholds default to datatrove's `GopherQualityFilter` / `GopherRepetitionFilter`; each is a
field of the config (None turns a rule off). Reason codes are datatrove's.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate

from cpmtool.data.clean.words import PUNCTUATION_SET, split_words

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass
class GopherQualityConfig:
    """Args:
    min_doc_words / max_doc_words: bounds on the number of non-symbol words.
    min_avg_word_length / max_avg_word_length: bounds on their mean length.
    max_symbol_word_ratio: most "#" (and, separately, "..."/"…") per word.
    max_bullet_lines_ratio: most lines starting with a bullet ("•", "-").
    max_ellipsis_lines_ratio: most lines ending with an ellipsis.
    max_non_alpha_words_ratio: despite the (datatrove) name, the *least* share of words with a letter.
    min_stop_words: least number of distinct stop words present.
    stop_words: the stop words (case-sensitive, as datatrove).
    """

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))


class GopherQuality:
    """Gopher's document quality heuristics; reasons `gopher_short_doc` ... `gopher_enough_stop_words`."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig | None = None):
        self.cfg = cfg or GopherQualityConfig()
        self._stop = frozenset(self.cfg.stop_words)

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        return self.check(record["text"])

    def check(self, text: str) -> bool | tuple[bool, str]:
        c = self.cfg
        words = split_words(text)
        n_words = len(words)
        non_symbol = [w for w in words if not PUNCTUATION_SET.issuperset(w)]
        n_non_symbol = len(non_symbol)
        if c.min_doc_words and n_non_symbol < c.min_doc_words:
            return False, "gopher_short_doc"
        if c.max_doc_words and n_non_symbol > c.max_doc_words:
            return False, "gopher_long_doc"
        # mean word length outside [3, 10] characters (NaN for no words compares False, as numpy's)
        if non_symbol:
            avg = sum(map(len, non_symbol)) / n_non_symbol
            if c.min_avg_word_length and avg < c.min_avg_word_length:
                return False, "gopher_below_avg_threshold"
            if c.max_avg_word_length and avg > c.max_avg_word_length:
                return False, "gopher_above_avg_threshold"
        if not n_words:
            return True  # datatrove divides by zero here; only reachable with min_doc_words off
        # hash or ellipsis to word ratio above 0.1
        if c.max_symbol_word_ratio and text.count("#") / n_words > c.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if (
            c.max_symbol_word_ratio
            and (text.count("...") + text.count("…")) / n_words > c.max_symbol_word_ratio
        ):
            return False, "gopher_too_many_ellipsis"
        # more than 90% of lines start with a bullet, or more than 30% end with an ellipsis
        lines = text.splitlines() or [""]
        if c.max_bullet_lines_ratio:
            bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
            if bullets / len(lines) > c.max_bullet_lines_ratio:
                return False, "gopher_too_many_bullets"
        if c.max_ellipsis_lines_ratio:
            ends = sum(s.rstrip().endswith(("...", "…")) for s in lines)
            if ends / len(lines) > c.max_ellipsis_lines_ratio:
                return False, "gopher_too_many_end_ellipsis"
        # at least 80% of words contain an alphabetic character
        if c.max_non_alpha_words_ratio:
            alpha = sum(1 for w in words if w.isalpha() or any(ch.isalpha() for ch in w))
            if alpha / n_words < c.max_non_alpha_words_ratio:
                return False, "gopher_below_alpha_threshold"
        if c.min_stop_words and len(self._stop.intersection(words)) < c.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


@dataclass
class GopherRepetitionConfig:
    """Args:
    dup_line_frac / dup_para_frac: most share of lines / paragraphs that repeat an earlier one.
    dup_line_char_frac / dup_para_char_frac: most share of characters in such repeats.
    top_n_grams: (n, frac): the most frequent word n-gram may cover at most frac of the characters.
    dup_n_grams: (n, frac): repeated word n-grams may cover at most frac of the characters.
    """

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their total length)."""
    seen: set[str] = set()
    n_dup = chars = 0
    for x in items:
        if x in seen:
            n_dup += 1
            chars += len(x)
        else:
            seen.add(x)
    return n_dup, chars


def _grams(joined: str, offsets: list[int], n: int) -> list[str]:
    # word n-grams as slices of the words joined once: one allocation per gram, no list joins
    return [joined[offsets[i] : offsets[i + n]] for i in range(len(offsets) - n)]


def _top_ngram_chars(spaced: str, offsets: list[int], n: int) -> int:
    # offsets index a " "-joined text, so a gram's slice carries one trailing space to drop
    counts = Counter(_grams(spaced, offsets, n))
    gram, count = counts.most_common(1)[0]
    return (len(gram) - 1) * count


def _repeated_ngram_chars(joined: str, offsets: list[int], n: int) -> int:
    grams = _grams(joined, offsets, n)
    if len(set(grams)) == len(grams):
        return 0
    # after a repeat, jump past it so overlapping repeats are not counted twice
    seen: set[str] = set()
    chars, i, end = 0, 0, len(grams)
    while i < end:
        gram = grams[i]
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


class GopherRepetition:
    """Gopher's repetition rules; reasons `dup_para_frac` ... `top_{n}_gram`, `duplicated_{n}_n_grams`."""

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig | None = None):
        self.cfg = cfg or GopherRepetitionConfig()

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        return self.check(record["text"])

    def check(self, text: str) -> bool | tuple[bool, str]:
        c = self.cfg
        if not text:
            return False, "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, chars = find_duplicates(paragraphs)
        if c.dup_para_frac and n_dup / len(paragraphs) > c.dup_para_frac:
            return False, "dup_para_frac"
        if c.dup_para_char_frac and chars / len(text) > c.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = _LINES.split(text)
        n_dup, chars = find_duplicates(lines)
        if c.dup_line_frac and n_dup / len(lines) > c.dup_line_frac:
            return False, "dup_line_frac"
        if c.dup_line_char_frac and chars / len(text) > c.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_words(text)
        lengths = [len(w) for w in words]
        if c.top_n_grams:
            spaced = " ".join(words) + " "
            offsets = list(accumulate((x + 1 for x in lengths), initial=0))
            for n, frac in c.top_n_grams:
                if len(words) >= n and _top_ngram_chars(spaced, offsets, n) / len(text) > frac:
                    return False, f"top_{n}_gram"
        if c.dup_n_grams:
            joined = "".join(words)  # datatrove joins these n-grams without a separator
            offsets = list(accumulate(lengths, initial=0))
            for n, frac in c.dup_n_grams:
                if len(words) >= n and _repeated_ngram_chars(joined, offsets, n) / len(text) > frac:
                    return False, f"duplicated_{n}_n_grams"
        return True
