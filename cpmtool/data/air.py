"""`annotate-pref`: preference pairs the AIR way (arXiv 2504.03612; spec: data-methods.md §4).

    annotate_pref(["tiny.jsonl", "smol.jsonl"], "-", model="smollm2-135m", keep_top_variance=0.5)

Input: instructions with several responses, in either shape (mixed freely):

    instruction record  {"id", "prompt" | "messages", "responses": [{"text", "generator"}, ...]}
                        (a response may also be a plain string, or carry `completion`/`response`
                        for `text` and `model` for `generator`)
    sample records      what `cpmtool rollout` writes: one line per completion with `completion`
                        and `group` (the prompt id); the lines of one group, from any number of
                        files, are one instruction. The generator is the line's `generator` or
                        `model` field, else the stem of the file it came from, so
                        `annotate-pref tiny.jsonl smol.jsonl` tells two rollouts apart.

Point-wise mode (AIR's setting, the default):

1. Annotation: a judge model scores each response alone, 1 to 10 with a simple rubric, and
   writes a one-sentence reason (generative scoring; the paper has the rationale first, see
   POINTWISE_TEMPLATE); `judge_samples` sampled judgments are averaged. A
   judgment without a parsable score in range counts as null (its raw text is kept); a response
   whose judgments are all null is left out of the steps below.
2. Instructions: the population variance of the response scores of each instruction; the
   `keep_top_variance` fraction with the highest variance is kept (`variance_tail="low"` keeps
   the lowest instead: the spec marks the direction as unverified, so both are offered).
3. Pairs: chosen has score >= `min_chosen`, and lo <= score(chosen) - score(rejected) <= hi;
   of the candidates, the highest chosen score wins, then the margin nearest the middle of
   [lo, hi], then input order. One pair per instruction.

Pairwise mode (`mode="pairwise"`, an UltraFeedback-style baseline): the judge sees two responses
and names the better one, for every pair, in both orders by default (a verdict that flips with the
order is position bias and counts as a tie). A response's score is its win fraction
(wins + ties/2) / (k - 1); chosen is the response with the highest, rejected the lowest-scored
response that chosen beat in a consistent verdict. UltraFeedback itself rates 4 completions
jointly on four 1-5 aspects; this mode keeps only its "the judge compares" character.

Output: one preference record per kept instruction, as `cpmtool train-dpo` reads it: the
instruction's fields plus `prompt`/`messages`, `chosen`, `rejected`, `score_chosen`,
`score_rejected`, `margin`, `generator_chosen`, `generator_rejected`, `score_variance`
(point-wise), `annotation` (the mode) and `responses` (every response with its `score`, the
parsed `judge_scores` and the raw `judgments`). Every input line of an instruction that yields no
pair is a reject with the reason: `too_few_responses`, `too_few_scores`, `low_variance` (or
`high_variance`), `no_pair`; lines that are no instruction at all: `no_responses`, `no_prompt`,
`bad_prompt`, `bad_messages`, `empty_prompt`, `bad_responses`. A judge request that an
`--engine openai` server refuses (a prompt over its context) leaves that response unscored, with
`judge_error: judge_request_refused` and the server's message in `judgments`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError
from cpmtool.io import Reject, RunStats, run_stream

MODES = ("pointwise", "pairwise")
TAILS = ("high", "low")
SCALE = (1.0, 10.0)

# The paper's rubric was not retrievable (§4.2); its finding is that a short, simple prompt works
# best, so this one is short. Asking for the score first and the reason after is a departure from
# "rationale, then score": small judges (smollm2-135m) lose the format after a long rationale.
POINTWISE_TEMPLATE = """\
Rate the response to the instruction on a scale from 1 (useless or wrong) to 10 (helpful, \
correct and complete). Start your answer with "Score:" and the number, then give one sentence of reason.

[Instruction]
{instruction}

[Response]
{response}"""

PAIRWISE_TEMPLATE = """\
Which response follows the instruction better: A or B? Answer "Better: A", "Better: B" or \
"Better: tie", then one sentence of reason.

[Instruction]
{instruction}

[Response A]
{response_a}

[Response B]
{response_b}"""

# Fields of a rollout sample record that belong to one completion, not to the instruction.
SAMPLE_FIELDS = frozenset({
    "id", "completion", "group", "sample", "reward", "correct", "finish_reason", "n_tokens", "token_ids",
    "logprobs", "chunks", "proposals", "proposal_tokens", "budget_forced", "maj_answer", "maj_ratio",
    "maj_correct", "model", "generator",
})

# ---------------------------------------------------------------- parsing judge answers

_NUM = r"(-?\d+(?:\.\d+)?|one|two|three|four|five|six|seven|eight|nine|ten)"
_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_BRACKETS = re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]", re.I)
# a marker word, up to 24 characters that are neither digits nor line breaks ("Score: **",
# "rating of", "I would rate it"), the number, an optional "/ D" or "out of D"
_MARKED = re.compile(r"\b(?:score|scores|scored|rating|rate|rated|grade|graded|give it|deserves)\b[^\d\n]{0,24}?"
                     + _NUM + r"(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?", re.I)
_FRACTION = re.compile(_NUM + r"\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", re.I)
_BOLD = re.compile(r"\*\*\s*" + _NUM + r"\s*\*\*", re.I)
_BARE = re.compile(r"^\W*" + _NUM + r"\W*$", re.I)


def _number(tok: str) -> float:
    return _WORDS[tok.lower()] if tok.lower() in _WORDS else float(tok)


def parse_score(text: str | None, lo: float = SCALE[0], hi: float = SCALE[1]) -> tuple[float | None, str | None]:
    """The score in a judge's answer: (score, None), or (None, reason).

    Looked for in this order, the last occurrence of the first kind found: `[[N]]`; a marker word
    (Score, Rating, rate, grade, "give it") followed by N, optionally "/D" or "out of D"; a bare
    "N/10" or "N out of 10"; a bold `**N**`; an answer that is nothing but N. N may be a decimal or
    a word (one..ten). A stated denominator must equal `hi`.

    Reasons: `no_score` (nothing found), `wrong_scale` (N/D with D != hi), `score_out_of_range`.
    """
    if not text or not text.strip():
        return None, "no_score"
    found = None
    for pattern in (_BRACKETS, _MARKED, _FRACTION, _BOLD, _BARE):
        hits = list(pattern.finditer(text))
        if hits:
            found = hits[-1]
            break
    if found is None:
        return None, "no_score"
    value = _number(found.group(1))
    denom = found.group(2) if found.re in (_MARKED, _FRACTION) else None
    if denom is not None and float(denom) != hi:
        return None, "wrong_scale"
    if not lo <= value <= hi:
        return None, "score_out_of_range"
    return value, None


_VERDICT_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)
_VERDICT_MARKED = re.compile(
    r"\b(?:better|winner|preferred|preference|verdict|choice|answer)\b\s*(?:response|output|is|:|=|\*|\s)*"
    r"\(?\b(A|B|1|2|tie|neither|both|equal)\b", re.I)
_VERDICT_PHRASE = re.compile(r"(?:\b(?:response|output|answer|assistant)\s*)?\(?\b([AB12])\)?\s*(?:is|was)\s+"
                             r"(?:clearly\s+|much\s+|slightly\s+)?(?:better|preferred|superior|stronger)", re.I)
_VERDICT_BARE = re.compile(r"^\W*(?:response\s*)?\(?(A|B|tie)\)?\W*$", re.I)
_VERDICT_TIE = re.compile(r"\b(?:tie|equally (?:good|bad|well)|both (?:are )?equal)\b", re.I)


def parse_verdict(text: str | None) -> tuple[str | None, str | None]:
    """The verdict of a pairwise judgment: ("A" | "B" | "tie", None), or (None, "no_verdict").

    Looked for in this order, last occurrence of the first kind found: `[[A]]`/`[[B]]`/`[[C]]`
    (MT-Bench's tie); a marker (Better, Winner, Preferred, Verdict, ...) followed by A/B/1/2/tie;
    "Response A is better"; an answer that is nothing but A or B; a bare tie phrase.
    """
    if not text or not text.strip():
        return None, "no_verdict"
    for pattern in (_VERDICT_BRACKETS, _VERDICT_MARKED, _VERDICT_PHRASE, _VERDICT_BARE, _VERDICT_TIE):
        hits = list(pattern.finditer(text))
        if hits:
            tok = (hits[-1].group(1) if pattern.groups else hits[-1].group(0)).upper()
            return {"A": "A", "1": "A", "B": "B", "2": "B"}.get(tok, "tie"), None
    return None, "no_verdict"


# ---------------------------------------------------------------- pure selection rules


def score_variance(scores: list[float]) -> float:
    """Population variance (divide by n) of the scores of one instruction's responses."""
    if not scores:
        raise ValueError("score_variance of no scores")
    mean = sum(scores) / len(scores)
    return sum((s - mean) ** 2 for s in scores) / len(scores)


def keep_by_variance(variances: list[float], q: float, tail: str = "high") -> list[bool]:
    """Which instructions to keep: the ceil(q * n) with the highest (`tail="high"`) or lowest variance.

    Ties at the cut go to the instruction that comes first, so the result is deterministic.
    """
    n = len(variances)
    k = math.ceil(q * n - 1e-9)  # 0.5 * 4 is 2 even when q * n is 2.0000000000000004
    sign = -1.0 if tail == "high" else 1.0
    order = sorted(range(n), key=lambda i: (sign * variances[i], i))
    kept = set(order[:k])
    return [i in kept for i in range(n)]


def select_pair(scores: list[float | None], min_chosen: float, margin: tuple[float, float]) -> tuple[int, int] | None:
    """(chosen index, rejected index) under AIR's rule, or None when no pair qualifies.

    Candidates: score[c] >= min_chosen and lo <= score[c] - score[r] <= hi (None scores never
    take part). Among them: the highest chosen score, then the margin nearest (lo + hi) / 2, then
    the lowest (c, r) indices.
    """
    lo, hi = margin
    mid = (lo + hi) / 2
    best = None
    for c, sc in enumerate(scores):
        if sc is None or sc < min_chosen:
            continue
        for r, sr in enumerate(scores):
            if r == c or sr is None or not lo <= sc - sr <= hi:
                continue
            key = (-sc, abs(sc - sr - mid), c, r)
            if best is None or key < best[0]:
                best = (key, (c, r))
    return None if best is None else best[1]


def combine_orders(first: str | None, second: str | None) -> str | None:
    """One comparison of responses i and j asked in both orders: "i", "j", "tie", or None.

    `first` is the verdict with i shown as A, `second` with j shown as A. Verdicts that disagree
    (each order prefers whichever response came first, or second) are position bias: a tie. A
    missing verdict leaves the other order's; none at all is None.
    """
    a = {"A": "i", "B": "j", "tie": "tie"}.get(first) if first else None
    b = {"A": "j", "B": "i", "tie": "tie"}.get(second) if second else None
    if a is None or b is None:
        return a or b
    return a if a == b else "tie"


def win_scores(k: int, outcomes: dict[tuple[int, int], str | None]) -> list[float | None]:
    """Win fraction of each of k responses, (wins + ties / 2) / comparisons made.

    `outcomes[(i, j)]` (i < j) is "i", "j", "tie" or None (no usable verdict: not counted).
    A response with no counted comparison gets None.
    """
    won = [0.0] * k
    seen = [0] * k
    for (i, j), o in outcomes.items():
        if o is None:
            continue
        seen[i] += 1
        seen[j] += 1
        if o == "tie":
            won[i] += 0.5
            won[j] += 0.5
        else:
            won[i if o == "i" else j] += 1.0
    return [won[i] / seen[i] if seen[i] else None for i in range(k)]


def select_pairwise(scores: list[float | None], outcomes: dict[tuple[int, int], str | None]) -> tuple[int, int] | None:
    """Chosen: the highest win fraction (first on ties) among responses that beat another one
    outright; rejected: the lowest-scored response it beat (first on ties)."""
    beaten: dict[int, list[int]] = {}
    for (i, j), o in outcomes.items():
        if o == "i":
            beaten.setdefault(i, []).append(j)
        elif o == "j":
            beaten.setdefault(j, []).append(i)
    if not beaten:
        return None
    c = min(beaten, key=lambda x: (-scores[x], x))
    r = min(beaten[c], key=lambda x: (scores[x], x))
    return c, r


# ---------------------------------------------------------------- instructions in


@dataclass
class Response:
    text: str
    generator: str | None
    source_id: str | None = None
    score: float | None = None
    judge_scores: list = field(default_factory=list)
    judgments: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        d = {"text": self.text, "generator": self.generator}
        if self.source_id is not None:
            d["id"] = self.source_id
        d.update(score=self.score, judge_scores=self.judge_scores, judgments=self.judgments)
        if self.score is None and self.error:
            d["judge_error"] = self.error
        return d


@dataclass
class Instruction:
    """One instruction, its responses and the input lines it came from."""

    id: str
    base: dict  # the instruction's own fields (prompt/messages, id, ...) for the output record
    text: str  # what the judge is shown as the instruction
    responses: list[Response]
    lines: list[tuple[dict, tuple[str, int]]]  # (input record, (source, line)) for rejects
    shape: str  # "instruction" | "samples"
    variance: float | None = None


def instruction_text(record: dict, prompt_field: str = "prompt") -> str:
    """The instruction as the judge reads it (`messages`, else `prompt_field`, else `prompt`), or a
    reject reason (`no_prompt`, `bad_prompt`, `empty_prompt`, `bad_messages`). A chat is shown as `role: content` lines unless it is one
    user turn (optionally after a system turn), which is shown as its content."""
    msgs = record.get("messages")
    if msgs is not None:
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            return _Reason("bad_messages")
        turns = [m for m in msgs if m["role"] != "system"]
        if len(turns) == 1 and turns[0]["role"] == "user":
            text = turns[0]["content"]
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    else:
        text = record.get(prompt_field, record.get("prompt"))
        if text is None:
            return _Reason("no_prompt")
        if not isinstance(text, str):
            return _Reason("bad_prompt")
    return text if text.strip() else _Reason("empty_prompt")


class _Reason(str):
    """A reject reason returned where a value was expected (a str subclass, told apart by type)."""


def _generator_of(d: dict) -> str | None:
    g = d.get("generator", d.get("model"))
    return None if g is None else str(g)


def _parse_responses(items) -> list[Response] | None:
    if not isinstance(items, list):
        return None
    out = []
    for x in items:
        if isinstance(x, str):
            out.append(Response(x, None))
            continue
        if not isinstance(x, dict):
            return None
        text = next((x[k] for k in ("text", "completion", "response") if k in x), None)
        if not isinstance(text, str):
            return None
        out.append(Response(text, _generator_of(x), None if x.get("id") is None else str(x["id"])))
    return out


def collect(records: Iterator[dict], stats: RunStats, prompt_field: str = "prompt") -> Iterator[Instruction | Reject]:
    """Read every record: instruction records and grouped sample records become Instructions
    (in order of first appearance); lines that are neither are Rejects. Buffers the whole input:
    the lines of one group may be anywhere (two rollout files one after the other)."""
    found: dict[tuple, Instruction] = {}
    for rec in records:
        pos = stats.position
        text = instruction_text(rec, prompt_field)
        if "responses" in rec:
            if isinstance(text, _Reason):
                yield Reject(rec, str(text), pos)
                continue
            resp = _parse_responses(rec["responses"])
            if resp is None:
                yield Reject(rec, "bad_responses", pos)
                continue
            base = {k: v for k, v in rec.items() if k != "responses"}
            # each instruction record stands alone, also when two share an id
            found[("rec", len(found))] = Instruction(str(rec["id"]), _with_prompt(base, prompt_field), text, resp,
                                                     [(rec, pos)], "instruction")
        elif "completion" in rec:
            if isinstance(text, _Reason):
                yield Reject(rec, str(text), pos)
                continue
            if not isinstance(rec["completion"], str):
                yield Reject(rec, "bad_responses", pos)
                continue
            group = str(rec.get("group", rec["id"]))
            gen = _generator_of(rec)
            if gen is None and pos[0] not in ("-", ""):
                gen = Path(pos[0]).name.split(".")[0]
            key = ("group", group)
            if key not in found:
                base = {k: v for k, v in rec.items() if k not in SAMPLE_FIELDS}
                base["id"] = group
                found[key] = Instruction(group, _with_prompt(base, prompt_field), text, [], [], "samples")
            found[key].responses.append(Response(rec["completion"], gen, str(rec["id"])))
            found[key].lines.append((rec, pos))
        else:
            yield Reject(rec, "no_responses", pos)
    yield from found.values()


def _with_prompt(base: dict, prompt_field: str) -> dict:
    # train-dpo reads `messages` or `prompt`; an instruction under another field is copied to `prompt`
    if "messages" not in base and "prompt" not in base and isinstance(base.get(prompt_field), str):
        base["prompt"] = base[prompt_field]
    return base


# ---------------------------------------------------------------- the run


class AirStats(RunStats):
    """RunStats plus the judge's tally (`judge`: judgments parsed and failed by reason) and the
    answer cache's hits/misses/calls, in the stats JSON and the summary line."""

    def __init__(self):
        super().__init__()
        self.judge: Counter = Counter()
        self.cache: dict | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["judge"] = dict(sorted(self.judge.items()))
        if self.cache is not None:
            d["cache"] = dict(self.cache)
        return d

    def summary(self) -> str:
        text = super().summary()
        judged = ", ".join(f"{k} {v}" for k, v in sorted(self.judge.items()))
        extra = f"judgments: {judged or 'none'}"
        if self.cache is not None:
            extra += f"; cache: {self.cache['hits']} hits, {self.cache['misses']} misses, {self.cache['calls']} calls"
        return f"{text}; {extra}"


def annotate_pref(
    inputs,
    output="-",
    *,
    model: str | None = "smollm2-135m",
    engine="native",
    api_base: str | None = None,
    api_key: str | None = None,
    cache: str | Path | None = None,
    no_cache: bool = False,
    max_batch: int = 16,
    mode: str = "pointwise",
    judge_samples: int = 1,
    both_orders: bool = True,
    keep_top_variance: float | None = None,
    variance_tail: str = "high",
    min_chosen: float | None = None,
    margin: tuple[float, float] | None = None,
    max_tokens: int = 64,
    temperature: float | None = None,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = 0,
    template: str | None = None,
    prefill: str | None = None,
    prompt_field: str = "prompt",
    rejects=None,
    stats_path=None,
    strict: bool = False,
    progress: bool | None = None,
) -> AirStats:
    """Judge the responses of every instruction in `inputs` and write preference records to `output`.

    Args:
        inputs, output: JSONL paths or `-`.
        model, engine, api_base, api_key: the judge (`cpmtool.engine.load_engine`); `engine` may
            also be an engine object with `generate(requests)`.
        cache, no_cache: the answer cache directory (default $CPMTOOL_HOME/cache), or none.
        max_batch: sequences decoded together (native); judge requests go to the engine in
            windows of 4 * max_batch, each window cached as soon as it is answered.
        mode: "pointwise" (AIR) | "pairwise" (UltraFeedback-style comparison baseline).
        judge_samples: judgments per response (pointwise; averaged) or per comparison (pairwise;
            majority); more than one samples at `temperature` (default 0.7 then, else greedy 0).
        both_orders: pairwise: ask each comparison in both orders (cancels position bias).
        keep_top_variance, variance_tail: pointwise: keep this fraction (0, 1] of instructions,
            by score variance, highest ("high") or lowest ("low") first. Default 1.0.
        min_chosen, margin: pointwise: chosen score >= min_chosen (default 7), margin (lo, hi)
            (default (1, 4)). AIR's values were not retrievable; these are guesses on the 1-10 scale.
        max_tokens, top_p, top_k, seed: judge sampling; each response's judgments are drawn from a
            seed derived from `seed`, the instruction id and the response index.
        template: replaces the judge prompt; placeholders {instruction} and {response}
            (pointwise) or {response_a} and {response_b} (pairwise).
        prefill: text that starts the judge's answer (e.g. "Score:"), after the chat template's
            assistant header; needs the judge's tokenizer. Parsed together with the answer.
        prompt_field: the record field holding a plain instruction (e.g. `instruction`).
        rejects, stats_path, strict, progress: as in `cpmtool.io.run_stream`.

    Raises:
        ConfigError: invalid or conflicting settings.
    """
    settings = _settings(mode=mode, judge_samples=judge_samples, keep_top_variance=keep_top_variance,
                         variance_tail=variance_tail, min_chosen=min_chosen, margin=margin, temperature=temperature,
                         template=template, max_batch=max_batch)
    if temperature is None:
        temperature = 0.7 if judge_samples > 1 else 0.0
    params = SamplingParams(n=judge_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_tokens=max_tokens, seed=seed)
    owned = isinstance(engine, str)
    if owned:
        from cpmtool.engine.cache import load_cached_engine

        engine = load_cached_engine(model, engine, cache=cache, no_cache=no_cache, api_base=api_base,
                                    api_key=api_key, max_batch=max_batch)
    judge = Judge(engine, params, settings["template"], prefill=prefill, window=4 * max_batch, seed=seed,
                  model_name=model)
    stats = AirStats()

    def stage(records: Iterator[dict]) -> Iterator[dict | Reject]:
        items = []
        for x in collect(records, stats, prompt_field):
            if isinstance(x, Reject):
                yield x
            elif len(x.responses) < 2:
                yield from _reject(x, "too_few_responses")
            else:
                items.append(x)
        if mode == "pointwise":
            yield from _pointwise(items, judge, stats, settings)
        else:
            yield from _pairwise(items, judge, stats, both_orders)
        stats.cache = judge.cache_stats()

    paths = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    try:
        return run_stream(paths, output, stage, rejects=rejects, stats_path=stats_path, strict=strict,
                          progress=progress, stats=stats)
    finally:
        if owned and hasattr(engine, "close"):
            engine.close()


def _settings(*, mode, judge_samples, keep_top_variance, variance_tail, min_chosen, margin, temperature, template,
              max_batch) -> dict:
    problems = []
    if mode not in MODES:
        problems.append(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if judge_samples < 1:
        problems.append(f"--judge-samples must be >= 1 (got {judge_samples})")
    if judge_samples > 1 and temperature == 0:
        problems.append("--judge-samples > 1 needs --temperature > 0 (greedy judgments are all the same)")
    if variance_tail not in TAILS:
        problems.append(f"--variance-tail must be one of {', '.join(TAILS)} (got {variance_tail!r})")
    if max_batch < 1:
        problems.append(f"--max-batch must be >= 1 (got {max_batch})")
    if mode == "pairwise":
        given = [f for f, v in (("--keep-top-variance", keep_top_variance), ("--min-chosen", min_chosen),
                                ("--margin", margin)) if v is not None]
        if given:
            problems.append(f"{', '.join(given)}: point-wise settings; --mode pairwise selects by win fraction")
    keep = 1.0 if keep_top_variance is None else keep_top_variance
    if not 0 < keep <= 1:
        problems.append(f"--keep-top-variance must be in (0, 1] (got {keep})")
    lo, hi = (1.0, 4.0) if margin is None else margin
    if not 0 <= lo <= hi:
        problems.append(f"--margin needs 0 <= lo <= hi (got {lo},{hi})")
    if template is None:
        template = POINTWISE_TEMPLATE if mode == "pointwise" else PAIRWISE_TEMPLATE
    need = ("{instruction}", "{response}") if mode == "pointwise" else ("{instruction}", "{response_a}",
                                                                          "{response_b}")
    missing = [p for p in need if p not in template]
    if missing:
        problems.append(f"the judge template lacks {', '.join(missing)}")
    if problems:
        raise ConfigError(problems)
    return {"keep": keep, "tail": variance_tail, "min_chosen": 7.0 if min_chosen is None else min_chosen,
            "margin": (lo, hi), "template": template}


def parse_margin(text: str) -> tuple[float, float]:
    """`"lo,hi"` -> (lo, hi). Raises ConfigError on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--margin takes lo,hi (e.g. 1,4), not {text!r}") from None


def _reject(item: Instruction, reason: str) -> Iterator[Reject]:
    """Every input line of `item`, rejected with `reason` and what the judge said about it."""
    if item.shape == "instruction":
        rec, pos = item.lines[0]
        out = dict(rec)
        out["responses"] = [r.to_dict() for r in item.responses]
        if item.variance is not None:
            out["score_variance"] = item.variance
        yield Reject(out, reason, pos)
        return
    for (rec, pos), resp in zip(item.lines, item.responses, strict=True):
        out = dict(rec)
        if resp.judgments:
            out.update(score=resp.score, judge_scores=resp.judge_scores, judgments=resp.judgments)
        if item.variance is not None:
            out["score_variance"] = item.variance
        yield Reject(out, reason, pos)


def _pair_record(item: Instruction, c: int, r: int, mode: str, judge_model: str | None) -> dict:
    rc, rr = item.responses[c], item.responses[r]
    out = dict(item.base)
    out.update(chosen=rc.text, rejected=rr.text, score_chosen=rc.score, score_rejected=rr.score,
               margin=round(rc.score - rr.score, 6), generator_chosen=rc.generator, generator_rejected=rr.generator)
    if item.variance is not None:
        out["score_variance"] = item.variance
    out.update(annotation=mode, judge=judge_model, responses=[x.to_dict() for x in item.responses])
    return out


def _pointwise(items: list[Instruction], judge: Judge, stats: AirStats, s: dict) -> Iterator[dict | Reject]:
    judge.score(items, stats)
    scored = []
    for it in items:
        vals = [r.score for r in it.responses if r.score is not None]
        if len(vals) < 2:
            yield from _reject(it, "too_few_scores")
            continue
        it.variance = round(score_variance(vals), 6)
        scored.append(it)
    keep = keep_by_variance([it.variance for it in scored], s["keep"], s["tail"])
    for it, k in zip(scored, keep, strict=True):
        if not k:
            yield from _reject(it, "low_variance" if s["tail"] == "high" else "high_variance")
            continue
        pair = select_pair([r.score for r in it.responses], s["min_chosen"], s["margin"])
        if pair is None:
            yield from _reject(it, "no_pair")
            continue
        yield _pair_record(it, *pair, "pointwise", judge.model_name)


def _pairwise(items: list[Instruction], judge: Judge, stats: AirStats, both_orders: bool) -> Iterator[dict | Reject]:
    outcomes = judge.compare(items, stats, both_orders)
    for it, out in zip(items, outcomes, strict=True):
        scores = win_scores(len(it.responses), out)
        for r, s in zip(it.responses, scores, strict=True):
            r.score = None if s is None else round(s, 6)
        pair = select_pairwise(scores, out)
        if pair is None:
            yield from _reject(it, "no_pair")
            continue
        yield _pair_record(it, *pair, "pairwise", judge.model_name)


class Judge:
    """Builds the judge requests, sends them in windows through the engine, parses the answers."""

    def __init__(self, engine, params: SamplingParams, template: str, *, prefill: str | None, window: int,
                 seed: int | None, model_name: str | None = None):
        self.engine = engine
        self.params = params
        self.template = template
        self.prefill = prefill
        self.window = max(1, window)
        self.seed = seed
        self.model_name = model_name
        # the openai engine has no encode: the server judges prompt lengths itself
        self.tokenizes = hasattr(engine, "encode")
        m = getattr(engine, "model", None)
        self.max_len = getattr(engine, "max_len", None) or (
            m.config.max_position_embeddings if m is not None and hasattr(m, "config") else None)
        if prefill is not None and getattr(engine, "tokenizer", None) is None:
            raise ConfigError("--prefill needs the judge's tokenizer (a local model; for --engine openai, "
                              "--model must name a local model)")

    def cache_stats(self) -> dict | None:
        st = getattr(self.engine, "stats", None)
        return st.to_dict() if st is not None and hasattr(st, "to_dict") else None

    def request(self, content: str, params: SamplingParams, rid: str) -> Request | str:
        """A judge request, or the reason it cannot be sent (`judge_prompt_too_long`)."""
        msgs = [{"role": "user", "content": content}]
        if self.prefill is not None:
            from cpmtool.model.tokenizer import chat_prompt

            req = Request(prompt=chat_prompt(self.engine.tokenizer, msgs) + self.prefill, params=params, id=rid)
        else:
            req = Request(messages=msgs, params=params, id=rid)
        if self.tokenizes and self.max_len is not None and len(self.engine.encode(req)) + 1 > self.max_len:
            return "judge_prompt_too_long"
        return req

    def run(self, requests: list[Request]) -> list[list[str] | str]:
        """The answer texts (prefill included) of each request, in order, window by window; a
        request the backend refused gives its error message (a str) instead."""
        out = []
        for i in range(0, len(requests), self.window):
            for res in self.engine.generate(requests[i:i + self.window]):
                out.append(res.error if res.error is not None
                           else [(self.prefill or "") + c.text for c in res.completions])
        return out

    def _seeded(self, *parts) -> SamplingParams:
        from cpmtool.data.rollout import derive_seed

        return self.params.with_(seed=derive_seed(self.seed, "judge", *parts))

    def score(self, items: list[Instruction], stats: AirStats) -> None:
        """Fill `score`, `judge_scores`, `judgments` of every response (point-wise)."""
        asks: list[tuple[Response, Request]] = []
        for it in items:
            for j, resp in enumerate(it.responses):
                content = self.template.replace("{response}", resp.text).replace("{instruction}", it.text)
                req = self.request(content, self._seeded(it.id, j), str(len(asks)))
                if isinstance(req, str):
                    resp.error = req
                    stats.judge[req] += 1
                    continue
                asks.append((resp, req))
        for (resp, _), texts in zip(asks, self.run([q for _, q in asks]), strict=True):
            if isinstance(texts, str):
                resp.judgments, resp.error = [texts], "judge_request_refused"
                stats.judge["judge_request_refused"] += 1
                continue
            resp.judgments = texts
            parsed = [parse_score(t) for t in texts]
            resp.judge_scores = [s for s, _ in parsed]
            for s, why in parsed:
                stats.judge["scored" if s is not None else why] += 1
            vals = [s for s, _ in parsed if s is not None]
            if vals:
                resp.score = round(sum(vals) / len(vals), 6)
            else:
                resp.error = Counter(why for _, why in parsed).most_common(1)[0][0]

    def compare(self, items: list[Instruction], stats: AirStats, both_orders: bool) -> list[dict]:
        """Per instruction, {(i, j): "i" | "j" | "tie" | None} over all pairs i < j (pairwise)."""
        asks: list[tuple[int, int, int, bool, Request]] = []  # item, i, j, swapped, request
        for n, it in enumerate(items):
            k = len(it.responses)
            for i in range(k):
                for j in range(i + 1, k):
                    for swapped in ((False, True) if both_orders else (False,)):
                        a, b = (j, i) if swapped else (i, j)
                        content = (self.template.replace("{response_a}", it.responses[a].text)
                                   .replace("{response_b}", it.responses[b].text).replace("{instruction}", it.text))
                        req = self.request(content, self._seeded(it.id, a, b), str(len(asks)))
                        if isinstance(req, str):
                            stats.judge[req] += 1
                            continue
                        asks.append((n, i, j, swapped, req))
        verdicts: dict[tuple[int, int, int], list] = {}
        for (n, i, j, swapped, _), texts in zip(asks, self.run([a[-1] for a in asks]), strict=True):
            if isinstance(texts, str):  # refused: no verdict in this order
                stats.judge["judge_request_refused"] += 1
                texts, parsed = [texts], []
            else:
                parsed = [parse_verdict(t) for t in texts]
            for v, why in parsed:
                stats.judge["verdict" if v is not None else why] += 1
            votes = Counter(v for v, _ in parsed if v is not None).most_common()
            # the majority of the sampled verdicts; a tie between the top two is a tie
            v = None if not votes else votes[0][0] if len(votes) == 1 or votes[0][1] > votes[1][1] else "tie"
            slot = verdicts.setdefault((n, i, j), [None, None])
            slot[1 if swapped else 0] = v
            log = items[n].responses
            for x in (i, j):
                log[x].judgments.extend(texts)
        out = []
        for n, it in enumerate(items):
            k = len(it.responses)
            out.append({(i, j): combine_orders(*verdicts.get((n, i, j), (None, None)))
                        for i in range(k) for j in range(i + 1, k)})
        return out
