"""IFEval's 25 verifiable instructions: checkers, parameters, instruction texts, and `ifeval_reward`.

    check("keywords:existence", response, {"keywords": ["tea", "cup"]})           # strict
    check("punctuation:no_comma", response, {}, loose=True)                         # loose
    ifeval_reward({"instruction_id_list": [...], "kwargs": [...]}, completion)      # (fraction, all)

The ids, parameter names and what each check accepts follow google-research's
`instruction_following_eval` (instructions.py, evaluation_lib.py), so IFEval's own input file
(`{"key", "prompt", "instruction_id_list", "kwargs"}`) grades as is; the code and the instruction
texts are our own. Each checker is a pure function `(response, kwargs) -> bool`.

Strict: the response as it is (an empty or blank response follows nothing). Loose: also the
response without its first line, without its last line, without both, and each of the four with
every `*` removed; the instruction is followed if any variant passes (IFEval's loose accuracy).

Departures from the official checkers (NLTK and langdetect are not dependencies here):
- sentences are counted by a rule-based splitter (`split_sentences`: a split after `.`, `!` or `?`
  and whitespace, unless the word before is a common abbreviation or an initial), not NLTK punkt;
- capital words (`change_case:capital_word_frequency`) are counted over `\\w+` tokens with inner
  apostrophes (`DON'T` is one word; NLTK's tokenizer makes it two);
- the language is detected by py3langid on the lower-cased text, not langdetect; as in the
  official code, a text the detector cannot judge (no letters) passes the language part;
- keywords are matched literally (the official code uses a keyword as a regular expression, which
  only differs for keywords holding regex metacharacters).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from cpmtool.errors import InputError

RELATIONS = ("less than", "at least")

# ISO 639-1 codes IFEval draws `language` from, with names for the instruction text.
LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish",
    "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITTERS = ("Section", "SECTION")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "Let me know if that helps.",
               "That is all.")
# Words the composer draws keywords from: common, topic-neutral, one token-ish each.
WORDS = (
    "answer", "balance", "bridge", "candle", "careful", "center", "change", "clear", "cloud", "common", "corner",
    "create", "detail", "early", "energy", "example", "family", "garden", "gentle", "history", "honest", "idea",
    "journey", "kitchen", "language", "letter", "light", "market", "memory", "method", "minute", "moment",
    "nature", "number", "ocean", "office", "order", "paper", "pattern", "people", "picture", "planet", "purpose",
    "question", "quiet", "reason", "river", "season", "signal", "simple", "source", "spirit", "story", "summer",
    "system", "teacher", "thought", "travel", "value", "window", "winter", "wonder", "yellow",
)

_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co", "no", "fig",
    "mt", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx", "dept",
})
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


# ---------------------------------------------------------------- text measures


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after `.`/`!`/`?` (and closing quotes/brackets) followed by
    whitespace, except after an abbreviation (`Dr.`, `e.g.`) or a one-letter initial (`J.`)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if text[m.start()] == ".":
            before = re.search(r"([\w.]+)$", text[start:m.start()])
            word = before.group(1).lower() if before else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of `\\w` characters (NLTK's RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of `text` by py3langid, or None when there is nothing to judge (no letters)."""
    if not re.search(r"[^\W\d_]", text):
        return None
    import py3langid

    return py3langid.classify(text.lower())[0]


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise InputError(f"relation must be one of {', '.join(map(repr, RELATIONS))} (got {relation!r})")


# ---------------------------------------------------------------- the checkers


def _keywords_existence(r: str, kw: dict) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"])


def _keywords_frequency(r: str, kw: dict) -> bool:
    n = len(re.findall(re.escape(kw["keyword"]), r, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], int(kw["frequency"]))


def _forbidden_words(r: str, kw: dict) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def _letter_frequency(r: str, kw: dict) -> bool:
    letter = kw["letter"].lower()
    return _compare(r.lower().count(letter), kw["let_relation"], int(kw["let_frequency"]))


def _response_language(r: str, kw: dict) -> bool:
    lang = detect_language(r)
    return lang is None or lang == kw["language"]


def _number_sentences(r: str, kw: dict) -> bool:
    return _compare(count_sentences(r), kw["relation"], int(kw["num_sentences"]))


def _number_paragraphs(r: str, kw: dict) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1  # a leading or trailing separator does not make a paragraph
            else:
                return False  # two separators in a row: an empty paragraph
    return n == int(kw["num_paragraphs"])


def _number_words(r: str, kw: dict) -> bool:
    return _compare(count_words(r), kw["relation"], int(kw["num_words"]))


def _nth_paragraph_first_word(r: str, kw: dict) -> bool:
    parts = r.split("\n\n")
    n = sum(1 for p in parts if p.strip())
    nth = int(kw["nth_paragraph"])
    if not 1 <= nth <= n:
        return False
    # IFEval indexes the raw split (blank pieces included) after counting the non-blank ones
    para = parts[nth - 1].strip()
    if not para:
        return False
    word = para.split()[0].lstrip("'\"")
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return n == int(kw["num_paragraphs"]) and first == str(kw["first_word"]).lower()


def _number_placeholders(r: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= int(kw["num_placeholders"])


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"]
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.search(pattern, r.lower(), flags=re.MULTILINE))


def _number_bullet_lists(r: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(kw["num_bullets"])


def _constrained_response(r: str, kw: dict) -> bool:
    r = r.strip()
    return any(opt in r for opt in CONSTRAINED_OPTIONS)


def _number_highlighted_sections(r: str, kw: dict) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= int(kw["num_highlights"])


def _multiple_sections(r: str, kw: dict) -> bool:
    parts = re.split(r"\s?" + re.escape(kw["section_spliter"]) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= int(kw["num_sections"])


def _json_format(r: str, kw: dict) -> bool:
    v = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        v = v.removeprefix(fence)
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def _title(r: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r: str, kw: dict) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if p.strip():
            valid.append(p)
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(r: str, kw: dict) -> bool:
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(r: str, kw: dict) -> bool:
    return r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(r: str, kw: dict) -> bool:
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


def _capital_word_frequency(r: str, kw: dict) -> bool:
    words = re.findall(r"\w+(?:['’]\w+)*", r)
    n = sum(1 for w in words if w.isupper())
    return _compare(n, kw["capital_relation"], int(kw["capital_frequency"]))


def _english_capital(r: str, kw: dict) -> bool:
    lang = detect_language(r)
    return r.isupper() and (lang is None or lang == "en")


def _english_lowercase(r: str, kw: dict) -> bool:
    lang = detect_language(r)
    return r.islower() and (lang is None or lang == "en")


def _no_comma(r: str, kw: dict) -> bool:
    return "," not in r


# ---------------------------------------------------------------- parameters and texts


def _relation(rng: random.Random) -> str:
    return rng.choice(RELATIONS)


def _words(rng: random.Random, k: int, avoid: set[str]) -> list[str]:
    return rng.sample([w for w in WORDS if w not in avoid], k)


def _sample_nth(rng: random.Random, ctx: dict) -> dict:
    n = rng.randint(1, 5)
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n),
            "first_word": _words(rng, 1, ctx["words"])[0]}


@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: its checker, the kwargs it needs, how to draw them, its text."""

    id: str
    check: Callable[[str, dict], bool]
    params: tuple[str, ...]
    sample: Callable[[random.Random, dict], dict]
    text: Callable[[dict], str]


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def _rel(relation: str, n: int, unit: str) -> str:
    unit = unit if n == 1 else unit + "s"
    return f"fewer than {n} {unit}" if relation == "less than" else f"at least {n} {unit}"


_TABLE = [
    Instruction("keywords:existence", _keywords_existence, ("keywords",),
                lambda rng, c: {"keywords": _words(rng, 2, c["words"])},
                lambda k: "Make sure the words " + " and ".join(f'"{w}"' for w in k["keywords"])
                + " appear in your response."),
    Instruction("keywords:frequency", _keywords_frequency, ("keyword", "frequency", "relation"),
                lambda rng, c: {"keyword": _words(rng, 1, c["words"])[0], "frequency": rng.randint(1, 3),
                                "relation": _relation(rng)},
                lambda k: (f'Use the word "{k["keyword"]}" '
                           + (f"fewer than {_times(k['frequency'])}" if k["relation"] == "less than"
                              else f"at least {_times(k['frequency'])}") + " in your response.")),
    Instruction("keywords:forbidden_words", _forbidden_words, ("forbidden_words",),
                lambda rng, c: {"forbidden_words": _words(rng, 2, c["words"])},
                lambda k: "Do not use any of these words: " + ", ".join(f'"{w}"' for w in k["forbidden_words"]) + "."),
    Instruction("keywords:letter_frequency", _letter_frequency, ("letter", "let_frequency", "let_relation"),
                lambda rng, c: {"letter": rng.choice("abcdefghijklmnopqrstuvwxyz"), "let_frequency": rng.randint(1, 10),
                                "let_relation": _relation(rng)},
                lambda k: (f'The letter "{k["letter"]}" should appear '
                           + (f"fewer than {_times(k['let_frequency'])}" if k["let_relation"] == "less than"
                              else f"at least {_times(k['let_frequency'])}") + " in your response.")),
    Instruction("language:response_language", _response_language, ("language",),
                lambda rng, c: {"language": rng.choice(list(LANGUAGES))},
                lambda k: f"Write your whole response in {LANGUAGES.get(k['language'], k['language'])}, "
                          "and in no other language."),
    Instruction("length_constraints:number_sentences", _number_sentences, ("num_sentences", "relation"),
                lambda rng, c: {"num_sentences": rng.randint(1, 20), "relation": _relation(rng)},
                lambda k: f"Your response should have {_rel(k['relation'], k['num_sentences'], 'sentence')}."),
    Instruction("length_constraints:number_paragraphs", _number_paragraphs, ("num_paragraphs",),
                lambda rng, c: {"num_paragraphs": rng.randint(1, 5)},
                lambda k: f"Write exactly {k['num_paragraphs']} paragraph{'s' if k['num_paragraphs'] > 1 else ''}, "
                          "separated from each other by the markdown divider ***."),
    Instruction("length_constraints:number_words", _number_words, ("num_words", "relation"),
                lambda rng, c: {"num_words": rng.randint(100, 500), "relation": _relation(rng)},
                lambda k: f"Answer with {_rel(k['relation'], k['num_words'], 'word')}."),
    Instruction("length_constraints:nth_paragraph_first_word", _nth_paragraph_first_word,
                ("num_paragraphs", "nth_paragraph", "first_word"), _sample_nth,
                lambda k: f"Write exactly {k['num_paragraphs']} paragraph{'s' if k['num_paragraphs'] > 1 else ''}, "
                          "separated by blank lines (two newlines). "
                          f"Paragraph number {k['nth_paragraph']} must begin with the word \"{k['first_word']}\"."),
    Instruction("detectable_content:number_placeholders", _number_placeholders, ("num_placeholders",),
                lambda rng, c: {"num_placeholders": rng.randint(1, 4)},
                lambda k: f"Include at least {k['num_placeholders']} placeholder"
                          f"{'s' if k['num_placeholders'] > 1 else ''} in square brackets, like [name]."),
    Instruction("detectable_content:postscript", _postscript, ("postscript_marker",),
                lambda rng, c: {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)},
                lambda k: f"End with a postscript that starts with {k['postscript_marker']}"),
    Instruction("detectable_format:number_bullet_lists", _number_bullet_lists, ("num_bullets",),
                lambda rng, c: {"num_bullets": rng.randint(1, 5)},
                lambda k: f"Your answer must hold exactly {k['num_bullets']} markdown bullet point"
                          f"{'s' if k['num_bullets'] > 1 else ''}, each on its own line starting with \"* \"."),
    Instruction("detectable_format:constrained_response", _constrained_response, (),
                lambda rng, c: {},
                lambda k: "Answer with one of these options: " + ", ".join(f'"{o}"' for o in CONSTRAINED_OPTIONS)),
    Instruction("detectable_format:number_highlighted_sections", _number_highlighted_sections, ("num_highlights",),
                lambda rng, c: {"num_highlights": rng.randint(1, 4)},
                lambda k: f"Highlight at least {k['num_highlights']} part{'s' if k['num_highlights'] > 1 else ''} "
                          "of your answer with markdown, like *a highlighted part*."),
    Instruction("detectable_format:multiple_sections", _multiple_sections, ("section_spliter", "num_sections"),
                lambda rng, c: {"section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(1, 5)},
                lambda k: f"Split your response into {k['num_sections']} section"
                          f"{'s' if k['num_sections'] > 1 else ''}, marking the start of each with "
                          f"\"{k['section_spliter']} X\" where X is its number."),
    Instruction("detectable_format:json_format", _json_format, (),
                lambda rng, c: {},
                lambda k: "Format your entire output as JSON; you may wrap it in a markdown code block."),
    Instruction("detectable_format:title", _title, (),
                lambda rng, c: {},
                lambda k: "Give your answer a title wrapped in double angular brackets, like <<a title>>."),
    Instruction("combination:two_responses", _two_responses, (),
                lambda rng, c: {},
                lambda k: "Give two different responses, separated by six asterisks: ******."),
    Instruction("combination:repeat_prompt", _repeat_prompt, ("prompt_to_repeat",),
                lambda rng, c: {"prompt_to_repeat": c["query"]},
                lambda k: "Before answering, repeat the request above word for word without any change "
                          "(only the request, not these instructions), then give your answer."),
    Instruction("startend:end_checker", _end_checker, ("end_phrase",),
                lambda rng, c: {"end_phrase": rng.choice(END_PHRASES)},
                lambda k: f"Finish your response with the exact phrase \"{k['end_phrase']}\" and nothing after it."),
    Instruction("startend:quotation", _quotation, (),
                lambda rng, c: {},
                lambda k: "Wrap your entire response in double quotation marks."),
    Instruction("change_case:capital_word_frequency", _capital_word_frequency,
                ("capital_frequency", "capital_relation"),
                lambda rng, c: {"capital_frequency": rng.randint(1, 20), "capital_relation": _relation(rng)},
                lambda k: f"Words written in ALL CAPITAL LETTERS should appear "
                          f"{_rel(k['capital_relation'], k['capital_frequency'], 'time')} in your response."),
    Instruction("change_case:english_capital", _english_capital, (),
                lambda rng, c: {},
                lambda k: "Write your entire response in English, in capital letters only."),
    Instruction("change_case:english_lowercase", _english_lowercase, (),
                lambda rng, c: {},
                lambda k: "Write your entire response in English, in lowercase letters only; no capital letters."),
    Instruction("punctuation:no_comma", _no_comma, (),
                lambda rng, c: {},
                lambda k: "Do not use any commas in your response."),
]
INSTRUCTIONS: dict[str, Instruction] = {i.id: i for i in _TABLE}

_FORMAT_IDS = ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections",
               "detectable_format:title", "detectable_format:number_highlighted_sections",
               "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
               "combination:two_responses", "combination:repeat_prompt", "startend:quotation",
               "startend:end_checker", "detectable_content:postscript")
_ENGLISH_IDS = ("keywords:existence", "keywords:frequency", "keywords:letter_frequency",
                "length_constraints:nth_paragraph_first_word", "startend:end_checker", "combination:repeat_prompt",
                "change_case:english_capital", "change_case:english_lowercase", "change_case:capital_word_frequency",
                "detectable_format:multiple_sections")
_CASE_IDS = ("change_case:english_capital", "change_case:english_lowercase", "change_case:capital_word_frequency")


def _conflicts() -> dict[str, frozenset[str]]:
    """Pairs that cannot (or can hardly) be satisfied together; symmetric. Our own table, built on
    the same idea as IFEval's INSTRUCTION_CONFLICTS: a fixed-answer instruction conflicts with all."""
    pairs = {("detectable_format:constrained_response", i) for i in INSTRUCTIONS}
    pairs |= {("detectable_format:json_format", i) for i in _FORMAT_IDS}
    pairs |= {("language:response_language", i) for i in _ENGLISH_IDS}
    pairs |= {(a, b) for a in _CASE_IDS for b in _CASE_IDS}
    pairs |= {("change_case:english_lowercase", "detectable_format:multiple_sections"),
              ("change_case:english_capital", "detectable_format:multiple_sections"),
              ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
              ("length_constraints:number_paragraphs", "combination:two_responses"),
              ("combination:two_responses", "combination:repeat_prompt"),
              ("combination:two_responses", "startend:quotation"),
              ("startend:quotation", "combination:repeat_prompt"),
              ("startend:end_checker", "detectable_content:postscript"),
              ("keywords:existence", "keywords:forbidden_words"),
              ("keywords:frequency", "keywords:forbidden_words"),
              ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections")}
    table: dict[str, set[str]] = {i: {i} for i in INSTRUCTIONS}
    for a, b in pairs:
        table[a].add(b)
        table[b].add(a)
    return {k: frozenset(v) for k, v in table.items()}


CONFLICTS = _conflicts()


# ---------------------------------------------------------------- checking


def _kwargs(instruction_id: str, kwargs: dict | None) -> dict:
    inst = INSTRUCTIONS.get(instruction_id)
    if inst is None:
        raise InputError(f"unknown IFEval instruction id {instruction_id!r}")
    # IFEval's files carry every parameter name of every instruction, null where unused
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    missing = [p for p in inst.params if p not in kw]
    if missing:
        raise InputError(f"{instruction_id} needs kwargs {', '.join(missing)}")
    return kw


def loose_variants(response: str) -> list[str]:
    """The 8 versions of a response IFEval's loose evaluation tries (the response first)."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def check(instruction_id: str, response: str, kwargs: dict | None = None, *, loose: bool = False) -> bool:
    """Whether `response` follows one instruction (strict, or loose as IFEval defines it).

    Raises:
        InputError: an unknown id, a missing parameter, or a relation other than "less than"/"at least".
    """
    kw = _kwargs(instruction_id, kwargs)
    fn = INSTRUCTIONS[instruction_id].check
    candidates = loose_variants(response) if loose else [response]
    return any(r.strip() and fn(r, kw) for r in candidates)


def instructions_of(record: dict) -> list[tuple[str, dict]]:
    """(id, kwargs) pairs of a record in IFEval's layout: `instruction_id_list` and `kwargs` (a list
    of dicts aligned with it; a single dict is shared by all, and a missing one means `{}`)."""
    ids = record.get("instruction_id_list")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError("instruction_id_list must be a list of instruction ids")
    kws = record.get("kwargs")
    if kws is None:
        kws = [{} for _ in ids]
    elif isinstance(kws, dict):
        kws = [kws for _ in ids]
    if not isinstance(kws, list) or len(kws) != len(ids) or not all(isinstance(k, dict) or k is None for k in kws):
        raise InputError(f"kwargs must be a list of {len(ids)} objects, one per instruction id")
    return [(i, k or {}) for i, k in zip(ids, kws, strict=True)]


def check_record(record: dict, response: str, *, loose: bool = False) -> list[bool]:
    """One bool per instruction of `record` (IFEval's instruction-level results)."""
    return [check(i, response, k, loose=loose) for i, k in instructions_of(record)]


def ifeval_reward(record: dict, completion: str, *, loose: bool = False) -> tuple[float | None, bool | None]:
    """(fraction of the record's instructions followed, whether all are): `--reward ifeval`.

    A record without `instruction_id_list` (or with an empty one) cannot be graded: (None, None).
    """
    if not record.get("instruction_id_list"):
        return None, None
    ok = check_record(record, completion, loose=loose)
    return sum(ok) / len(ok), all(ok)


def sample_instruction(rng: random.Random, *, query: str, taken: list[str] | tuple[str, ...] = (),
                       used_words: set[str] | None = None,
                       allowed: list[str] | tuple[str, ...] | None = None) -> tuple[str, dict, str] | None:
    """Draw an instruction compatible with those `taken`, its kwargs and its text, or None if none fits.

    `query` is the request the instruction is added to (`combination:repeat_prompt` repeats it);
    `used_words` are kept out of drawn keywords so that keywords never collide.
    """
    blocked = set().union(*(CONFLICTS[t] for t in taken if t in CONFLICTS)) if taken else set()
    pool = [i for i in (allowed or INSTRUCTIONS) if i not in blocked]
    if not pool:
        return None
    iid = rng.choice(sorted(pool))
    inst = INSTRUCTIONS[iid]
    kw = inst.sample(rng, {"query": query, "words": set(used_words or ())})
    return iid, kw, inst.text(kw)


__all__ = ["CONFLICTS", "INSTRUCTIONS", "LANGUAGES", "Instruction", "check", "check_record", "count_sentences",
           "count_words", "detect_language", "ifeval_reward", "instructions_of", "loose_variants",
           "sample_instruction", "split_sentences"]
