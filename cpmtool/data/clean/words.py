"""Words and sentences the way datatrove counts them, without spaCy at run time.

datatrove splits English text with `spacy.blank("en")` (word_tokenize drops whitespace tokens)
and counts sentences with spaCy's rule-based Sentencizer. The Gopher, C4 and FineWeb thresholds
were tuned on those counts, so this module runs the same algorithm (spaCy's `_split_affixes` /
`_attach_tokens`, ported from spacy/tokenizer.pyx) over spaCy's own English rules, saved as data
in assets/spacy_en_rules.json (regenerate with assets/make_spacy_en_rules.py). A per-chunk cache
makes it fast: most whitespace-separated chunks of a corpus repeat.

Also here: datatrove's punctuation sets and `simplify_text`, which MinHash and exact dedup use.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

_RULES_PATH = Path(__file__).parent / "assets" / "spacy_en_rules.json"
_CACHE_MAX = 500_000
_WS_RUNS = re.compile(r"(\s+)")


class WordSplitter:
    """spaCy's English tokenizer algorithm over its rule data; `split(text)` -> list of words."""

    def __init__(self, rules: dict):
        self._prefix = re.compile(rules["prefix"]).search
        self._suffix = re.compile(rules["suffix"]).search
        self._infix = re.compile(rules["infix"]).finditer
        self._url = re.compile(rules["url"]).match if rules.get("url") else None
        self._token = re.compile(rules["token"]).match if rules.get("token") else None
        self._specials: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in rules["specials"].items()}
        self.sentence_punct = frozenset(rules["sentence_punct"])
        self._cache: dict[str, tuple[str, ...]] = {}
        # Special cases that contain affix characters (":)", "and/or") are split by the affix
        # rules first and merged back afterwards, as spaCy's special-case matcher does.
        self._merge: dict[tuple[str, ...], tuple[str, ...]] = {}
        for key, out in self._specials.items():
            if " " in key:
                continue
            pieces = tuple(self._chunk(key, with_specials=False))
            if len(pieces) > 1:
                self._merge.setdefault(pieces, out)
        self._merge_max = max((len(p) for p in self._merge), default=0)

    def split(self, text: str) -> list[str]:
        """Words of `text` (whitespace dropped), as datatrove's `split_into_words` returns them."""
        cache = self._cache
        out: list[str] = []
        for chunk in text.split():
            toks = cache.get(chunk)
            out.extend(toks if toks is not None else self._cached(chunk))
        return out

    def count_sentences(self, text: str) -> int:
        """How many sentences spaCy's Sentencizer finds in `text` (0 for blank text)."""
        punct = self.sentence_punct
        n, seen_period, any_token = 0, False, False
        for piece in _WS_RUNS.split(text):
            if not piece:
                continue
            if piece.isspace():
                # spaCy keeps a whitespace run as a token unless it is one space (a leading
                # space goes to the previous token); such a token is never punctuation.
                words = [piece[1:] if piece[0] == " " and any_token else piece]
                if not words[0]:
                    continue
            else:
                words = self._cache.get(piece) or self._cached(piece)
            for w in words:
                if not any_token:
                    n, any_token = 1, True
                in_punct = w in punct
                if seen_period and not in_punct and not _is_punct(w):
                    n += 1
                    seen_period = False
                elif in_punct:
                    seen_period = True
        return n

    def _cached(self, chunk: str) -> tuple[str, ...]:
        toks = self._tokens(chunk)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[chunk] = toks
        return toks

    def _tokens(self, chunk: str) -> tuple[str, ...]:
        special = self._specials.get(chunk)
        if special is not None:
            return special
        toks = self._chunk(chunk, with_specials=True)
        if self._merge and len(toks) > 1:
            toks = self._merge_specials(toks)
        return tuple(toks)

    def _chunk(self, string: str, *, with_specials: bool) -> list[str]:
        specials = self._specials if with_specials else {}
        prefixes: list[str] = []
        suffixes: list[str] = []
        last_size = 0
        while string and len(string) != last_size:
            if self._token and self._token(string):
                break
            if string in specials:
                break
            last_size = len(string)
            m = self._prefix(string)
            pre_len = m.end() - m.start() if m else 0
            if pre_len:
                prefix, minus_pre = string[:pre_len], string[pre_len:]
                if minus_pre and minus_pre in specials:
                    string = minus_pre
                    prefixes.append(prefix)
                    break
            m = self._suffix(string[pre_len:])
            suf_len = m.end() - m.start() if m else 0
            if suf_len:
                suffix, minus_suf = string[-suf_len:], string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    string = minus_suf
                    suffixes.append(suffix)
                    break
            if pre_len and suf_len and pre_len + suf_len <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
        out = prefixes
        if string:
            if string in specials:
                out.extend(specials[string])
            elif (self._token and self._token(string)) or (self._url and self._url(string)):
                out.append(string)
            else:
                start = 0
                for m in self._infix(string):
                    a, b = m.start(), m.end()
                    if a == 0:
                        continue
                    if a != start:
                        out.append(string[start:a])
                    if a != b:
                        out.append(string[a:b])
                    start = b
                if string[start:]:
                    out.append(string[start:])
        out.extend(reversed(suffixes))
        return out

    def _merge_specials(self, toks: list[str]) -> list[str]:
        out, i, n = [], 0, len(toks)
        while i < n:
            for j in range(min(n, i + self._merge_max), i + 1, -1):
                hit = self._merge.get(tuple(toks[i:j]))
                if hit is not None:
                    out.extend(hit)
                    i = j
                    break
            else:
                out.append(toks[i])
                i += 1
        return out


def _is_punct(word: str) -> bool:
    # spaCy's IS_PUNCT: every character is in a Unicode punctuation category.
    return all(unicodedata.category(c).startswith("P") for c in word)


@lru_cache(1)
def english() -> WordSplitter:
    """The shared English splitter (rules loaded once per process)."""
    return WordSplitter(json.loads(_RULES_PATH.read_text(encoding="utf-8")))


def split_words(text: str) -> list[str]:
    """Words of `text` as datatrove's English `split_into_words` gives them."""
    return english().split(text)


# datatrove.utils.text.PUNCTUATION / TERMINAL_PUNCTUATION (v0.10): PUNCTUATION decides which
# words are "symbols" in Gopher; TERMINAL_PUNCTUATION ends a line in FineWeb's line_punct_ratio.
PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)
_TERMINAL_PATH = Path(__file__).parent / "assets" / "terminal_punctuation.txt"
TERMINAL_PUNCTUATION = frozenset(_TERMINAL_PATH.read_text(encoding="utf-8").split())
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
_PUNCT_TRANS = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_NUMBERS = None


def simplify_text(text: str) -> str:
    """datatrove's `simplify_text` with its default TextNormConfig, for dedup signatures.

    Lower-case, every number -> "0", punctuation -> space, whitespace collapsed, diacritics dropped.
    """
    global _NUMBERS
    if _NUMBERS is None:
        import regex

        _NUMBERS = regex.compile(r"\p{Nd}+([.,،٫⎖⎗⎘]{1}\p{Nd}+)?")
    text = _NUMBERS.sub("0", text.lower()).translate(_PUNCT_TRANS)
    text = " ".join(text.split())
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.strip()
