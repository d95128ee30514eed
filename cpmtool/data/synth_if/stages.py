"""The four synth-if stages; each reads JSONL records and writes JSONL records.

    decompose(["alpaca_seed.jsonl"], "dec.jsonl", model="smollm2-135m")
    compose(["dec.jsonl"], "comp.jsonl", pool="dec.jsonl", rounds=2)
    generate(["comp.jsonl"], "gen.jsonl", k=4)
    filter_responses(["gen.jsonl"], "sft.jsonl", pairs="dpo.jsonl")

Records (fields added; every input field is kept):

- decompose: `query` (the instruction), `basic_query`, `constraints` [{type, constraint,
  simplified_query, question}], `eval_questions` (the non-empty questions). Rejects:
  `no_prompt`, `unparsable_decomposition` and `no_constraints` (both carry the model's `raw` answer),
  `prompt_too_long`, `request_refused` (an `--engine openai` server refused the request; its
  `error` is kept).
- compose: `prompt` (the query with the added constraints), `query`, `added_constraints`
  [{source: "ifeval"|"pool", text, id | question}], `eval_questions` (the input's plus the pool
  constraints'), `instruction_id_list` and `kwargs` (IFEval's layout, for the checkers and
  `--reward ifeval`). Rejects: `no_prompt`, `no_constraint_added`.
- generate: `responses` (k strings), `finish_reasons`. Rejects: `no_prompt`, `prompt_too_long`,
  `request_refused`.
- filter: SFT records `prompt` + `completion` (the first response that passes every check),
  `satisfied`, `verdicts` (per response: pass, score, ifeval, judge); preference pairs
  (`prompt`, `chosen` = the last passing response, `rejected` = the last failing one,
  `score_chosen`, `score_rejected`, `margin`) to `pairs`. Rejects: `no_responses`, `unsatisfied`
  (no response passes, with drop_unsatisfied).

Departures from UltraIF (kkk-an/UltraIF): composition appends constraints to the query as a list
(drawn from the decomposed pool and from IFEval's verifiable instructions) instead of having a
trained UltraComposer rewrite the query; verifiable constraints are checked by the IFEval
checkers, not the judge; the judge must give a verdict for every question (a missing one fails).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.data.synth_if import prompts
from cpmtool.data.synth_if.parse import parse_decomposition, parse_judgment, parse_question
from cpmtool.engine.types import Request, SamplingParams
from cpmtool.errors import ConfigError, InputError
from cpmtool.io import JsonlWriter, Reject, RunStats, read_records, run_stream
from cpmtool.rewards.ifeval import INSTRUCTIONS, check, instructions_of, sample_instruction


@dataclass
class SynthStats(RunStats):
    """RunStats plus the stage's own counts and the answer cache's hits/misses/calls."""

    counts: dict = field(default_factory=dict)
    cache: object = None  # a CacheStats, read when the stats are written

    def bump(self, key: str, by: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + by

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(self.counts)
        if self.cache is not None:
            d["cache"] = self.cache.to_dict()
        return d

    def summary(self) -> str:
        text = super().summary()
        extra = [f"{k} {v}" for k, v in sorted(self.counts.items())]
        if self.cache is not None:
            c = self.cache
            extra.append(f"cache {c.hits} hits, {c.misses} misses, {c.calls} model calls")
        return text + ("; " + "; ".join(extra) if extra else "")


def derive_seed(seed: int | None, *parts) -> int | None:
    """A per-request seed from the run's seed and the record, stable whatever the batch holds
    (so the cache key of a request does not depend on its neighbours)."""
    if seed is None:
        return None
    return zlib.crc32(":".join(str(p) for p in (seed, *parts)).encode())


def query_of(record: dict) -> str | None:
    """The instruction a record asks: `query`, `prompt`, or Alpaca's `instruction` (+ `input`)."""
    for key in ("query", "prompt"):
        v = record.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    ins = record.get("instruction")
    if isinstance(ins, str) and ins.strip():
        extra = record.get("input")
        return ins.strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    return None


# ---------------------------------------------------------------- the model


class Asker:
    """Builds requests for an engine (chat messages when the model has a chat template, else plain
    text) and sends a batch of them in one call."""

    def __init__(self, engine, params: SamplingParams, system: str | None = None):
        self.engine = engine
        self.params = params
        self.system = system
        tok = getattr(engine, "tokenizer", None)
        self.chat = tok is None or bool(getattr(tok, "chat_template", None))
        model = getattr(engine, "model", None)
        cfg = getattr(model, "config", None)
        self.max_len = getattr(engine, "max_len", None) or getattr(cfg, "max_position_embeddings", None)
        self.encodes = callable(getattr(engine, "encode", None))

    def request(self, text: str, rid: str, *seed_parts, params: SamplingParams | None = None,
                prefill: str | None = None) -> Request | str:
        """A request for `text`, or the reject reason `prompt_too_long`. `prefill` starts the
        model's answer (after the chat template's assistant header): the caller prepends it to
        the answer it gets back."""
        p = params or self.params
        p = p.with_(seed=derive_seed(p.seed, *seed_parts))
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        plain = (f"{self.system}\n\n" if self.system else "") + text
        if prefill is not None:
            from cpmtool.model.tokenizer import chat_prompt

            tok = getattr(self.engine, "tokenizer", None)
            if tok is None:
                raise ConfigError("--prefill needs the model's tokenizer (a local model; for --engine openai, "
                                  "--model must name a local model)")
            req = Request(prompt=(chat_prompt(tok, msgs) if self.chat else plain) + prefill, params=p, id=rid)
        elif self.chat:
            req = Request(messages=msgs, params=p, id=rid)
        else:
            req = Request(prompt=plain, params=p, id=rid)
        if self.encodes and self.max_len is not None and len(self.engine.encode(req)) + 1 > self.max_len:
            return "prompt_too_long"
        return req

    def ask(self, requests: list[Request]) -> list[list[str] | str]:
        """The completion texts of each request (one engine call for the whole list); a request the
        backend refused gives its error message (a str) instead."""
        if not requests:
            return []
        return [r.error if r.error is not None else [c.text for c in r.completions]
                for r in self.engine.generate(requests)]


def open_model(model: str | None, engine="native", *, api_base: str | None = None, api_key: str | None = None,
               cache: str | Path | None = None, no_cache: bool = False, max_batch: int = 16):
    """(engine, close): `engine` may be an engine object (used as is) or a backend name, opened
    behind the answer cache (`cpmtool.engine.cache.load_cached_engine`)."""
    if not isinstance(engine, str):
        return engine, lambda: None
    from cpmtool.engine.cache import load_cached_engine

    # lazy: a rerun answered from the cache (or a filter with nothing to judge) never loads the weights
    eng = load_cached_engine(model, engine, cache=cache, no_cache=no_cache, api_base=api_base, api_key=api_key,
                             max_batch=max_batch, lazy=True)
    return eng, getattr(eng, "close", lambda: None)


def _windows(records: Iterator[dict], size: int, stats: RunStats) -> Iterator[list[tuple[dict, tuple[str, int]]]]:
    buf = []
    for rec in records:
        buf.append((rec, stats.position))
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _run(inputs, output, stage, stats, *, rejects, stats_path, strict, progress, close) -> RunStats:
    paths = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    try:
        return run_stream(paths, output, stage, rejects=rejects, stats_path=stats_path, strict=strict,
                          progress=progress, stats=stats)
    finally:
        close()


def _stats_for(engine) -> SynthStats:
    return SynthStats(cache=getattr(engine, "stats", None) if hasattr(engine, "cache") else None)


def _check_window(size: int) -> None:
    if size < 1:
        raise ConfigError(f"--max-batch must be >= 1 (got {size})")


# ---------------------------------------------------------------- decompose


def decompose(inputs, output="-", *, model: str | None = "smollm2-135m", engine="native", api_base: str | None = None,
              api_key: str | None = None, cache: str | Path | None = None, no_cache: bool = False,
              max_batch: int = 16, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = 0, questions: bool = True, prefill: str | None = None, rejects=None,
              stats_path=None, strict: bool = False, progress: bool | None = None) -> RunStats:
    """Decompose each instruction into a basic query, constraints and evaluation questions (UltraIF A+B).

    One decomposition request per record, then one evaluation-question request per constraint
    (`questions=False` skips them); each batch of `max_batch` records goes to the model in one call.

    Args:
        inputs, output: JSONL paths or `-`. Records need `prompt`, `query` or `instruction` (+ `input`).
        model, engine, api_base, api_key, cache, no_cache, max_batch: the model and its answer cache.
        max_tokens, temperature, top_p, seed: sampling (UltraIF decomposes greedily).
        questions: also ask one evaluation question per constraint.
        rejects, stats_path, strict, progress: as in `cpmtool.io.run_stream`.
    """
    _check_window(max_batch)
    eng, close = open_model(model, engine, api_base=api_base, api_key=api_key, cache=cache, no_cache=no_cache,
                            max_batch=max_batch)
    asker = Asker(eng, SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
    stats = _stats_for(eng)

    def stage(records):
        for window in _windows(records, max_batch, stats):
            reqs, todo = [], []
            for rec, pos in window:
                q = query_of(rec)
                if q is None:
                    yield Reject(rec, "no_prompt", pos)
                    continue
                req = asker.request(prompts.DECOMPOSE.format(query=q), f"d{len(reqs)}", "decompose", rec["id"],
                                    prefill=prefill)
                if isinstance(req, str):
                    yield Reject(rec, req, pos)
                    continue
                reqs.append(req)
                todo.append((rec, pos, q))
            answers = asker.ask(reqs)
            parsed = []
            for (rec, pos, q), texts in zip(todo, answers, strict=True):
                if isinstance(texts, str):
                    yield Reject(dict(rec, error=texts), "request_refused", pos)
                    continue
                raw = (prefill or "") + texts[0]
                d = parse_decomposition(raw)
                if isinstance(d, str):
                    yield Reject(dict(rec, raw=raw), d, pos)
                else:
                    parsed.append((rec, q, d))
            if questions:
                yield from _add_questions(asker, parsed, stats)
            else:
                for rec, q, d in parsed:
                    yield _decomposed(rec, q, d)

    return _run(inputs, output, stage, stats, rejects=rejects, stats_path=stats_path, strict=strict,
                progress=progress, close=close)


def _add_questions(asker: Asker, parsed: list, stats: SynthStats) -> Iterator[dict]:
    reqs, where = [], []
    for rec, q, d in parsed:
        for j, c in enumerate(d["constraints"]):
            req = asker.request(prompts.EVAL_QUESTION.format(query=q, constraint=c["constraint"]), f"q{len(reqs)}",
                                "question", rec["id"], j)
            if isinstance(req, str):
                c["question"] = None
                stats.bump("questions_unparsable")
                continue
            reqs.append(req)
            where.append(c)
    for c, texts in zip(where, asker.ask(reqs), strict=True):
        c["question"] = None if isinstance(texts, str) else parse_question(texts[0])
        if c["question"] is None:
            stats.bump("questions_refused" if isinstance(texts, str) else "questions_unparsable")
    for rec, q, d in parsed:
        yield _decomposed(rec, q, d)


def _decomposed(rec: dict, q: str, d: dict) -> dict:
    cons = [dict(c, question=c.get("question")) for c in d["constraints"]]
    return dict(rec, query=q, basic_query=d["basic_query"], constraints=cons,
                eval_questions=[c["question"] for c in cons if c["question"]])


# ---------------------------------------------------------------- compose


@dataclass(frozen=True)
class PoolConstraint:
    text: str
    question: str
    type: str
    source: str  # the id of the record it was decomposed from


def load_pool(paths) -> list[PoolConstraint]:
    """The constraints (with a non-empty evaluation question) of decomposed records."""
    paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    out, seen = [], set()
    for rec in read_records(paths, stats=RunStats()):
        for c in rec.get("constraints") or []:
            if not isinstance(c, dict):
                continue
            text, question = c.get("constraint"), c.get("question")
            if isinstance(text, str) and text.strip() and isinstance(question, str) and question.strip():
                key = text.strip().lower()
                if key not in seen:
                    seen.add(key)
                    out.append(PoolConstraint(text.strip(), question.strip(), str(c.get("type") or ""),
                                              str(rec.get("id", ""))))
    return out


def render_prompt(query: str, texts: list[str]) -> str:
    """The query followed by its added constraints as a list."""
    if not texts:
        return query
    return query + "\n\nFollow these constraints:\n" + "".join(f"- {_sentence(t)}\n" for t in texts).rstrip("\n")


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?\"" else text + "."


def compose(inputs, output="-", *, pool=None, rounds: int = 3, pool_ratio: float = 0.5,
            ifeval_ids: list[str] | None = None, seed: int = 0, rejects=None, stats_path=None, strict: bool = False,
            progress: bool | None = None) -> RunStats:
    """Add `rounds` constraints to each query, one per round, each compatible with those before it.

    A round draws from the decomposed pool (probability `pool_ratio`, when a pool is given) or from
    IFEval's verifiable instructions (parameters drawn at random, text rendered, and
    `instruction_id_list`/`kwargs` recorded). Draws are seeded by `seed` and the record id.

    Args:
        inputs, output: JSONL paths or `-` (decomposed records or any prompt records).
        pool: JSONL path(s) of decomposed records whose constraints (those with an evaluation
            question) may be added; their number is reported as `pool_constraints`.
        rounds: constraints added per query (UltraIF: up to 3).
        pool_ratio: the chance that a round draws from the pool rather than IFEval.
        ifeval_ids: the IFEval instruction ids that may be drawn (default: all 25).
        seed, rejects, stats_path, strict, progress: as usual.
    """
    problems = []
    if rounds < 1:
        problems.append(f"--rounds must be >= 1 (got {rounds})")
    if not 0 <= pool_ratio <= 1:
        problems.append(f"--pool-ratio must be in [0, 1] (got {pool_ratio})")
    unknown = [i for i in ifeval_ids or () if i not in INSTRUCTIONS]
    if unknown:
        problems.append(f"unknown IFEval ids: {', '.join(unknown)}")
    if problems:
        raise ConfigError(problems)
    items = load_pool(pool) if pool else []
    stats = SynthStats()
    if pool:  # an empty pool (a small model decomposed nothing usable) leaves IFEval alone, visibly
        stats.counts["pool_constraints"] = len(items)

    def stage(records):
        for rec in records:
            q = query_of(rec)
            if q is None:
                yield Reject(rec, "no_prompt")
                continue
            try:
                out = compose_one(rec, q, items, rounds=rounds, pool_ratio=pool_ratio, ifeval_ids=ifeval_ids,
                                  rng=random.Random(derive_seed(seed, "compose", rec["id"])))
            except InputError:
                yield Reject(rec, "bad_instructions")
                continue
            if out is None:
                yield Reject(rec, "no_constraint_added")
                continue
            stats.bump("constraints_added", len(out["added_constraints"]))
            yield out

    return _run(inputs, output, stage, stats, rejects=rejects, stats_path=stats_path, strict=strict,
                progress=progress, close=lambda: None)


def compose_one(rec: dict, query: str, pool: list[PoolConstraint], *, rounds: int, pool_ratio: float,
                ifeval_ids: list[str] | None, rng: random.Random) -> dict | None:
    """One composed record (see the module docstring), or None when no constraint could be added."""
    ids, kwargs = [], []
    if rec.get("instruction_id_list"):  # constraints the record already carries stay verifiable
        for i, k in instructions_of(rec):
            ids.append(i)
            kwargs.append(k)
    questions = [q for q in rec.get("eval_questions") or [] if isinstance(q, str) and q.strip()]
    added: list[dict] = []
    used_words: set[str] = set()
    for _ in range(rounds):
        candidates = [c for c in pool if c.source != str(rec.get("id")) and c.question not in questions]
        if candidates and rng.random() < pool_ratio:
            c = rng.choice(candidates)
            added.append({"source": "pool", "text": c.text, "question": c.question, "type": c.type})
            questions.append(c.question)
            continue
        got = sample_instruction(rng, query=query, taken=ids, used_words=used_words, allowed=ifeval_ids)
        if got is None:
            continue
        iid, kw, text = got
        ids.append(iid)
        kwargs.append(kw)
        used_words |= {w for v in kw.values() for w in (v if isinstance(v, list) else [v]) if isinstance(w, str)}
        added.append({"source": "ifeval", "text": text, "id": iid})
    if not added:
        return None
    out = dict(rec, query=query, prompt=render_prompt(query, [a["text"] for a in added]),
               added_constraints=list(rec.get("added_constraints") or []) + added, eval_questions=questions)
    if ids:
        out.update(instruction_id_list=ids, kwargs=kwargs)
    return out


# ---------------------------------------------------------------- generate


def generate(inputs, output="-", *, k: int = 4, model: str | None = "smollm2-135m", engine="native",
             api_base: str | None = None, api_key: str | None = None, cache: str | Path | None = None,
             no_cache: bool = False, max_batch: int = 16, max_tokens: int = 512, temperature: float = 1.0,
             top_p: float = 0.95, seed: int | None = 0, system: str | None = None, rejects=None, stats_path=None,
             strict: bool = False, progress: bool | None = None) -> RunStats:
    """Sample `k` responses to each record's `prompt` (UltraIF: k=5, temperature 1, top-p 0.95).

    Args:
        k: responses per prompt (one request with n=k).
        system: an optional system message (UltraIF asks for direct answers without preamble).
        others: as in `decompose`.
    """
    if k < 1:
        raise ConfigError(f"--k must be >= 1 (got {k})")
    _check_window(max_batch)
    eng, close = open_model(model, engine, api_base=api_base, api_key=api_key, cache=cache, no_cache=no_cache,
                            max_batch=max_batch)
    asker = Asker(eng, SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
                  system=system)
    stats = _stats_for(eng)

    def stage(records):
        for window in _windows(records, max(1, max_batch // k), stats):
            reqs, todo = [], []
            for rec, pos in window:
                p = rec.get("prompt")
                p = p if isinstance(p, str) and p.strip() else query_of(rec)
                if p is None:
                    yield Reject(rec, "no_prompt", pos)
                    continue
                req = asker.request(p, f"g{len(reqs)}", "generate", rec["id"])
                if isinstance(req, str):
                    yield Reject(rec, req, pos)
                    continue
                reqs.append(req)
                todo.append((rec, pos))
            results = eng.generate(reqs) if reqs else []
            for (rec, pos), res in zip(todo, results, strict=True):
                if res.error is not None:
                    yield Reject(dict(rec, error=res.error), "request_refused", pos)
                    continue
                yield dict(rec, responses=[c.text for c in res.completions],
                           finish_reasons=[c.finish_reason for c in res.completions])

    return _run(inputs, output, stage, stats, rejects=rejects, stats_path=stats_path, strict=strict,
                progress=progress, close=close)


# ---------------------------------------------------------------- filter


def filter_responses(inputs, output="-", *, pairs: str | Path | None = None, drop_unsatisfied: bool = True,
                     loose: bool = False, model: str | None = "smollm2-135m", engine="native",
                     api_base: str | None = None, api_key: str | None = None, cache: str | Path | None = None,
                     no_cache: bool = False, max_batch: int = 16, max_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = 0, rejects=None, stats_path=None, strict: bool = False,
                     progress: bool | None = None) -> RunStats:
    """Check every response; write SFT records (first passing response) and preference pairs.

    A response passes when every verifiable instruction holds (IFEval checkers, strict or `loose`)
    and the judge answers YES to every evaluation question (one judge request per response,
    greedy, all questions at once). Its score is the fraction of checks passed.

    Args:
        pairs: where to write preference pairs (chosen passes, rejected fails), the record format
            train-dpo reads; none written when None.
        drop_unsatisfied: reject a prompt none of whose responses passes (`unsatisfied`); without
            it, its last response is written with `satisfied: false` (UltraIF's behaviour).
        loose: IFEval's loose checking.
        others: as in `decompose` (sampling applies to the judge).
    """
    _check_window(max_batch)
    if pairs is not None and (str(pairs) == "-" or str(pairs) == str(output)):
        raise ConfigError(f"--pairs {pairs} must be a file other than the output")
    eng, close = open_model(model, engine, api_base=api_base, api_key=api_key, cache=cache, no_cache=no_cache,
                            max_batch=max_batch)
    asker = Asker(eng, SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
    stats = _stats_for(eng)
    pair_out = JsonlWriter(pairs) if pairs is not None else None

    def stage(records):
        for window in _windows(records, max_batch, stats):
            yield from _filter_window(window, asker, stats, pair_out, drop_unsatisfied=drop_unsatisfied, loose=loose)

    if pair_out is None:
        return _run(inputs, output, stage, stats, rejects=rejects, stats_path=stats_path, strict=strict,
                    progress=progress, close=close)
    with pair_out:
        return _run(inputs, output, stage, stats, rejects=rejects, stats_path=stats_path, strict=strict,
                    progress=progress, close=close)


def _filter_window(window, asker: Asker, stats: SynthStats, pair_out, *, drop_unsatisfied: bool, loose: bool):
    ready, reqs, slots = [], [], []
    for rec, pos in window:
        responses = rec.get("responses")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            yield Reject(rec, "no_responses", pos)
            continue
        try:
            verifiable = instructions_of(rec) if rec.get("instruction_id_list") else []
            checks = [[check(i, r, kw, loose=loose) for i, kw in verifiable] for r in responses]
        except InputError:
            yield Reject(rec, "bad_instructions", pos)
            continue
        questions = [q for q in rec.get("eval_questions") or [] if isinstance(q, str) and q.strip()]
        judged: list = [None] * len(responses)
        query = query_of(rec) or rec.get("prompt") or ""
        if questions:
            for j, r in enumerate(responses):
                if not r.strip():
                    judged[j] = [False] * len(questions)
                    continue
                req = asker.request(prompts.JUDGE.format(query=rec.get("prompt") or query, response=r,
                                                         questions=prompts.numbered(questions)),
                                    f"j{len(reqs)}", "judge", rec["id"], j)
                if isinstance(req, str):
                    judged[j] = False  # too long to judge: the response fails
                    stats.bump("judge_too_long")
                    continue
                reqs.append(req)
                slots.append((judged, j, len(questions)))
        ready.append((rec, pos, checks, judged, questions))
    for (judged, j, n), texts in zip(slots, asker.ask(reqs), strict=True):
        v = None if isinstance(texts, str) else parse_judgment(texts[0], n)
        if v is None:  # a refused or unreadable judgment: the response fails
            stats.bump("judge_refused" if isinstance(texts, str) else "judge_unparsable")
        judged[j] = v if v is not None else False
    for rec, pos, checks, judged, questions in ready:
        yield from _assemble(rec, pos, checks, judged, questions, stats, pair_out, drop_unsatisfied)


def _assemble(rec, pos, checks, judged, questions, stats, pair_out, drop_unsatisfied):
    responses = rec["responses"]
    verdicts = []
    for r, ok, jv in zip(responses, checks, judged, strict=True):
        judge_ok = [] if not questions else (jv if isinstance(jv, list) else [False] * len(questions))
        n = len(ok) + len(judge_ok)
        passed = bool(r.strip()) and all(ok) and all(judge_ok) and jv is not False
        score = (sum(ok) + sum(judge_ok)) / n if n else float(passed)
        verdicts.append({"pass": passed, "score": score, "ifeval": ok,
                         "judge": jv if isinstance(jv, list) else (None if not questions else "unparsable")})
    passing = [j for j, v in enumerate(verdicts) if v["pass"]]
    failing = [j for j, v in enumerate(verdicts) if not v["pass"]]
    prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else query_of(rec)
    base = {k: v for k, v in rec.items() if k not in ("responses", "finish_reasons")}
    if pair_out is not None and passing and failing:
        c, r = passing[-1], failing[-1]
        pair_out.write(dict(base, id=f"{rec['id']}-pair", prompt=prompt, chosen=responses[c], rejected=responses[r],
                            score_chosen=verdicts[c]["score"], score_rejected=verdicts[r]["score"],
                            margin=verdicts[c]["score"] - verdicts[r]["score"]))
        stats.bump("pairs")
    if not passing and drop_unsatisfied:
        yield Reject(dict(rec, verdicts=verdicts), "unsatisfied", pos)
        return
    pick = passing[0] if passing else len(responses) - 1
    yield dict(base, prompt=prompt, completion=responses[pick], satisfied=bool(passing), verdicts=verdicts)
