"""Reading model answers robustly: JSON in prose or code fences, Python-style literals, YES/NO verdicts.

Each parser returns the parsed value or None (or a reason code); none of them raises on a
malformed answer, so a bad answer becomes a counted reject that carries its raw text.
"""

from __future__ import annotations

import ast
import json
import re

from cpmtool.data.synth_if.prompts import CONSTRAINT_TYPES

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)


def _balanced_spans(text: str, open_ch: str, close_ch: str):
    """Every top-level `open_ch ... close_ch` span of `text`, skipping brackets inside strings."""
    depth, start, quote, escaped = 0, None, None, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'" and depth > 0:
            # an apostrophe inside prose ("don't") would open a string that never closes
            if ch == "'" and not _opens_python_string(text, i):
                continue
            quote = ch
        elif ch == open_ch:
            if depth == 0:
                start = i
            depth += 1
        elif ch == close_ch and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]


def _opens_python_string(text: str, i: int) -> bool:
    before = text[:i].rstrip()
    return not before or before[-1] in "{[,:("


def _loads(blob: str):
    try:
        return json.loads(blob)
    except ValueError:
        pass
    fixed = re.sub(r",\s*([}\]])", r"\1", blob)  # trailing commas
    try:
        return json.loads(fixed)
    except ValueError:
        pass
    try:
        return ast.literal_eval(fixed)  # single quotes, True/False/None
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        pass
    # last resort: JSON's true/false/null inside otherwise Python-style (single-quoted) literals
    py = re.sub(r"\b(true|false|null)\b", lambda m: {"true": "True", "false": "False", "null": "None"}[m.group(1)],
                fixed)
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def extract_json(text: str, want: type = dict):
    """The first JSON object (`want=dict`) or array (`want=list`) in a model's answer, or None.

    Tries the whole text, then each fenced code block, then every balanced `{...}` / `[...]` span;
    each candidate through json, json without trailing commas, and Python literal syntax. Last,
    the text from the first bracket on goes through `json_repair`, which closes what max_tokens
    cut off and drops stray brackets (a small model's usual faults); a repair without a non-empty
    string value in it is no answer.
    """
    if not isinstance(text, str):
        return None
    open_ch, close_ch = ("{", "}") if want is dict else ("[", "]")
    candidates = [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for c in candidates:
        v = _loads(c) if c else None
        if isinstance(v, want):
            return v
    spans = list(_balanced_spans(text, open_ch, close_ch))
    v = _loads(spans[0]) if spans else None
    if isinstance(v, want):
        return v
    # the first object is broken: repair it before looking at later spans, which may be its own
    # members (an inner constraint object after a stray `}`); only when it looks like JSON (a key
    # or string right after the bracket), not prose such as "use {braces}"
    start = text.find(open_ch)
    if start >= 0 and text[start + 1:].lstrip()[:1] in ("\"", "'", "{", "["):
        import json_repair

        v = json_repair.loads(text[start:])
        if isinstance(v, want) and _has_text(v):
            return v
    for c in spans[1:]:
        v = _loads(c)
        if isinstance(v, want):
            return v
    return None


def _has_text(v) -> bool:
    """Whether a (repaired) value holds any non-empty string value: `{unclosed:` repairs to
    `{"unclosed": ""}`, which says nothing."""
    if isinstance(v, dict):
        return any(_has_text(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_text(x) for x in v)
    return isinstance(v, str) and bool(v.strip())


def _norm_key(k) -> str:
    return re.sub(r"[\s_\-]+", " ", str(k)).strip().lower()


def parse_decomposition(text: str) -> dict | str:
    """A decomposition answer -> {"basic_query", "constraints": [{"type", "constraint", "simplified_query"}]},
    or a reason code: `unparsable_decomposition` (no JSON object) or `no_constraints`
    (`Complex` false, or no constraint found).

    Keys are matched loosely ("Basic Query", "basic_query"; "Format Constraints", "format");
    a constraint may be an object with "constraint" or a plain string.
    """
    d = extract_json(text, dict)
    if d is None:
        return "unparsable_decomposition"
    keys = {_norm_key(k): v for k, v in d.items()}
    complex_ = keys.get("complex")
    if complex_ is False or (isinstance(complex_, str) and complex_.strip().lower() == "false"):
        return "no_constraints"
    basic = keys.get("basic query")
    constraints = []
    for ctype in CONSTRAINT_TYPES:
        items = keys.get(f"{ctype} constraints", keys.get(ctype))
        if isinstance(items, (str, dict)):
            items = [items]
        if not isinstance(items, list):
            continue
        for it in items:
            if isinstance(it, str):
                c, simplified = it, None
            elif isinstance(it, dict):
                ik = {_norm_key(k): v for k, v in it.items()}
                c, simplified = ik.get("constraint"), ik.get("simplified query")
            else:
                continue
            if isinstance(c, str) and c.strip():
                constraints.append({"type": ctype, "constraint": c.strip(),
                                    "simplified_query": simplified.strip() if isinstance(simplified, str) else None})
    if not constraints:
        return "no_constraints"
    return {"basic_query": basic.strip() if isinstance(basic, str) and basic.strip() else None,
            "constraints": constraints}


def parse_question(text: str) -> str | None:
    """An evaluation-question answer -> the question, or None (unparsable or empty: UltraIF drops it).

    JSON `{"question": "..."}` (or a list of questions: the first); else the first line of the
    answer that ends with a question mark.
    """
    d = extract_json(text, dict)
    if d is not None:
        q = {_norm_key(k): v for k, v in d.items()}.get("question")
        if isinstance(q, list):
            q = next((x for x in q if isinstance(x, str) and x.strip()), None)
        return q.strip() if isinstance(q, str) and q.strip() else None
    for line in (text or "").splitlines():
        line = line.strip().strip('"').strip()
        if line.endswith("?") and len(line) > 3:
            return re.sub(r"^(question\s*:\s*)", "", line, flags=re.IGNORECASE)
    return None


_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _score(v) -> bool | None:
    if isinstance(v, dict):
        v = {_norm_key(k): x for k, x in v.items()}.get("score")
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        m = _VERDICT.search(v)
        return m.group(1).lower() == "yes" if m else None
    return None


def parse_judgment(text: str, n_questions: int) -> list[bool] | None:
    """A judge's answer -> one verdict per question (True = YES), or None when any is missing.

    JSON `{"Question 1": {"explanation", "score"}, ...}` (keys holding "question" in any case, a
    list of such objects, or bare "YES"/"NO" values); else lines like `Question 2: ... NO`. UltraIF
    passes a response when no question is scored NO; we also require a verdict for every question,
    so a truncated answer fails instead of passing on the questions it left out.
    """
    found: dict[int, bool] = {}
    d = extract_json(text, dict)
    if d is None or not any(re.search(r"question", str(k), re.IGNORECASE) for k in d):
        arr = extract_json(text, list)
        if arr is not None:
            d = {f"question {i}": v for i, v in enumerate(arr, 1)}
    if d is not None:
        for k, v in d.items():
            m = re.search(r"question\s*(\d+)", str(k), re.IGNORECASE)
            s = _score(v)
            if m and s is not None:
                found.setdefault(int(m.group(1)), s)
    if len([i for i in found if 1 <= i <= n_questions]) < n_questions:
        for m in re.finditer(r"question\s*(\d+)\b[^\n]*?\b(yes|no)\b", text or "", re.IGNORECASE):
            found.setdefault(int(m.group(1)), m.group(2).lower() == "yes")
    verdicts = [found.get(i) for i in range(1, n_questions + 1)]
    return None if any(v is None for v in verdicts) else verdicts
