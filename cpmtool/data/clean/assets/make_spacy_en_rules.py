"""Regenerate spacy_en_rules.json: spaCy's English tokenizer rules as plain data.

cpmtool's word splitter (cpmtool/data/clean/words.py) runs spaCy's affix algorithm in plain
Python over these rules, so the Gopher/C4/FineWeb counts match datatrove's (which tokenizes
English with `spacy.blank("en")`) without spaCy at run time. spaCy is MIT-licensed
(https://github.com/explosion/spaCy); the rules below are its data, unchanged.

    pip install spacy && python cpmtool/data/clean/assets/make_spacy_en_rules.py
"""

import json
from pathlib import Path

import spacy
from spacy.pipeline import Sentencizer
from spacy.symbols import ORTH


def main() -> None:
    nlp = spacy.blank("en")
    tok = nlp.tokenizer
    rules = {
        "spacy_version": spacy.__version__,
        "prefix": tok.prefix_search.__self__.pattern,
        "suffix": tok.suffix_search.__self__.pattern,
        "infix": tok.infix_finditer.__self__.pattern,
        "url": tok.url_match.__self__.pattern if tok.url_match else None,
        "token": tok.token_match.__self__.pattern if tok.token_match else None,
        "specials": {k: [t.get(ORTH, t.get("ORTH")) for t in v] for k, v in sorted(tok.rules.items())},
        "sentence_punct": sorted(Sentencizer.default_punct_chars),
    }
    out = Path(__file__).with_name("spacy_en_rules.json")
    out.write_text(json.dumps(rules, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
