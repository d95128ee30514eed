"""C4's line and document rules (Raffel et al. 2020), as datatrove v0.10's `C4QualityFilter`.

Line-level rules drop lines; three rules drop the whole document (`lorem_ipsum`,
`curly_bracket`, `too_few_sentences`). A kept document's text becomes its kept lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpmtool.data.clean.words import english

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


@dataclass
class C4Config:
    """Args (datatrove's defaults; FineWeb runs it with filter_no_terminal_punct=False):
    remove_citations: delete "[1]", "[edit]", "[citation needed]".
    filter_no_terminal_punct: drop lines not ending in . ? ! " ' (or ending in "...").
    min_num_sentences: drop the document with fewer sentences in its kept lines (-1: off).
    min_words_per_line: drop lines with fewer whitespace-separated words (-1: off).
    max_word_length: drop lines with a longer word (-1: off).
    filter_lorem_ipsum: drop the document if a kept line says "lorem ipsum".
    filter_javascript: drop lines mentioning "javascript".
    filter_curly_bracket: drop the document if a kept line has "{".
    filter_policy: drop lines about terms of use, privacy or cookie policy.
    """

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class C4Quality:
    """C4 rules; replaces `record["text"]` by its kept lines. Reasons: `lorem_ipsum`,
    `curly_bracket`, `too_few_sentences`."""

    name = "c4"

    def __init__(self, cfg: C4Config | None = None):
        self.cfg = cfg or C4Config()
        self._splitter = english()

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        out = self.check(record["text"])
        if isinstance(out, str):
            record["text"] = out
            return True
        return out

    def check(self, text: str) -> str | tuple[bool, str]:
        """The kept text, or (False, reason)."""
        c = self.cfg
        n_sentences = 0
        kept = []
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if c.max_word_length != -1 and any(len(w) > c.max_word_length for w in words):
                continue
            if c.remove_citations:
                line = CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < c.min_words_per_line:
                continue
            lower = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in lower:
                return False, "lorem_ipsum"
            if c.filter_javascript and "javascript" in lower:
                continue
            if c.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if c.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            if c.min_num_sentences != -1:
                n_sentences += self._splitter.count_sentences(line)
            kept.append(line)
        if n_sentences < c.min_num_sentences:
            return False, "too_few_sentences"
        return "\n".join(kept).strip()
