"""Text normalisation: Unicode NFC, line endings and odd spaces, control characters.

Runs first, so every later rule and the dedup signatures see one spelling of the same text.
Each step can be turned off; a document whose text is missing or ends up empty is dropped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# C0/C1 controls except \t and \n, plus zero-width and bidi marks that carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Unicode space separators (no-break, en/em, ideographic, ...) that are not a plain space.
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_INNER_RUNS = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")


@dataclass
class NormaliseConfig:
    """Args:
    nfc: apply Unicode NFC.
    line_endings: turn \\r\\n and \\r into \\n.
    control_chars: delete control, zero-width and bidi characters (tab and newline stay).
    unicode_spaces: turn Unicode space separators (no-break, em, ideographic ...) into a space.
    strip_lines: delete spaces and tabs at the end of every line and around the text.
    collapse_spaces: squeeze runs of spaces/tabs inside a line to one space (indentation stays).
    max_blank_lines: at most this many blank lines in a row (-1: leave them).
    """

    nfc: bool = True
    line_endings: bool = True
    control_chars: bool = True
    unicode_spaces: bool = True
    strip_lines: bool = True
    collapse_spaces: bool = False
    max_blank_lines: int = 1


def normalise_text(text: str, cfg: NormaliseConfig) -> str:
    """`text` with the steps of `cfg` applied."""
    if cfg.line_endings and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if cfg.control_chars:
        text = _CONTROL.sub("", text)
    if cfg.unicode_spaces and not text.isascii():
        text = _SPACES.sub(" ", text)
    if cfg.collapse_spaces:
        text = _INNER_RUNS.sub(" ", text)
    if cfg.strip_lines:
        text = _TRAILING.sub("", text).strip()
    if cfg.max_blank_lines >= 0:
        keep = cfg.max_blank_lines + 1  # newlines in a row
        text = re.sub(rf"\n{{{keep + 1},}}", "\n" * keep, text)
    return text


class Normalise:
    """Normalises `record["text"]` in place; drops `no_text` (missing / not a string) and `empty`."""

    name = "normalise"

    def __init__(self, cfg: NormaliseConfig | None = None):
        self.cfg = cfg or NormaliseConfig()

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        text = record.get("text")
        if not isinstance(text, str):
            return False, "no_text"
        text = normalise_text(text, self.cfg)
        if not text.strip():
            return False, "empty"
        record["text"] = text
        return True
