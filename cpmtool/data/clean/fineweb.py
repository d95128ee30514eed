"""FineWeb's own quality rules (Penedo et al. 2024), as datatrove v0.10's `FineWebQualityFilter`."""

from __future__ import annotations

from dataclasses import dataclass

from cpmtool.data.clean.gopher import find_duplicates
from cpmtool.data.clean.words import TERMINAL_PUNCTUATION, split_words


@dataclass
class FineWebConfig:
    """Args:
    line_punct_thr: least share of lines ending in terminal punctuation.
    line_punct_exclude_zero: do not drop documents where that share is exactly 0.
    short_line_thr / short_line_length: most share of lines with at most that many characters.
    char_duplicates_ratio: most share of characters in lines that repeat an earlier line.
    new_line_ratio: most newlines per word.
    """

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class FineWebQuality:
    """Reasons: `empty`, `line_punct_ratio`, `short_line_ratio`, `char_dup_ratio`, `list_ratio`."""

    name = "fineweb"

    def __init__(self, cfg: FineWebConfig | None = None):
        self.cfg = cfg or FineWebConfig()
        self._stop = tuple(TERMINAL_PUNCTUATION)

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        return self.check(record["text"])

    def check(self, text: str) -> bool | tuple[bool, str]:
        c = self.cfg
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return False, "empty"
        ratio = sum(1 for line in lines if line.endswith(self._stop)) / len(lines)
        if ratio < c.line_punct_thr and not (ratio == 0 and c.line_punct_exclude_zero):
            return False, "line_punct_ratio"
        ratio = sum(1 for line in lines if len(line) <= c.short_line_length) / len(lines)
        if ratio > c.short_line_thr:
            return False, "short_line_ratio"
        ratio = find_duplicates(lines)[1] / len(text.replace("\n", ""))
        if ratio > c.char_duplicates_ratio:
            return False, "char_dup_ratio"
        n_words = len(split_words(text))
        if n_words and text.count("\n") / n_words > c.new_line_ratio:
            return False, "list_ratio"
        return True
