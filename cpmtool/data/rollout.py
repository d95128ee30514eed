"""`rollout`: sample n completions per prompt record, grade them, write one sample record each.

    rollout(["tasks.jsonl"], "-", model="cpm-tiny", n=8, reward="math", vote=True)

Input: prompt records with `messages` (rendered by the tokenizer's chat template; used when a
record has both) or a plain `prompt` (sent as is, or as one user turn with `chat=True`).
Output: one sample record per completion, in the order groups finish: the prompt record's fields plus

    id             "<group>-<sample>"  (the prompt's id is kept in `group`)
    completion     the generated text (special tokens and a stop string left out)
    group, sample  prompt id, sample index 0..n-1
    reward         float or null (no grading / nothing to grade against)
    correct        bool or null
    finish_reason  "stop" (EOS or a stop string) | "length" (max tokens or budget)
    n_tokens       completion tokens (force-answer: thinking + cue + answer tokens)
    token_ids, logprobs     with logprobs=True (log-prob of each sampled token; null for cue tokens)
    maj_answer, maj_ratio, maj_correct      with vote=True (maj_correct only when a gold answer exists)
    chunks         chunk mode: [{"policy_version", "n_tokens"}, ...], one per call that extended it
    proposals, proposal_tokens              aggregate mode: the proposal texts of each layer
    budget_forced  force-answer mode: whether the answer cue was appended

Modes (see `rollout` for the flags):

- plain: the engine's streaming generation; a group is written as soon as its n samples finish.
- vote (TTRL): the answers of the n samples (last `\\boxed{}`, else `####` / `answer is`) are voted
  on (`cpmtool.rewards.vote`); reward 1.0 for agreeing with the majority, else 0.0. `correct` and
  `maj_correct` grade against the gold `answer` when there is one and are never used for the reward.
- chunk (MiniCPM4 chunk-wise rollout): one call generates at most C new tokens per trajectory.
  Unfinished trajectories are saved to the state file (prompt ids, tokens, behaviour log-probs,
  the policy version of each chunk) and continued by the next call from exactly where they stopped
  (prompt ids + tokens so far as the new prompt). A group is written when all n of its samples have
  finished, so GRPO always sees whole groups; until then its finished samples wait in the state
  too. The state file is removed once nothing is left. With greedy decoding the result equals one
  uninterrupted run; with sampling each chunk draws from its own seed (derived from seed, group,
  sample and chunk index), so it is reproducible but not the same draw as an uninterrupted run.
- aggregate (AFT propose-and-aggregate): see `cpmtool.data.aggregate`.
- budget (budget forcing): `truncate` stops every sample at B tokens; `force-answer` stops the
  thinking at B tokens, appends the answer cue (default `"\\nFinal answer: \\boxed{"`) and
  generates at most `answer_tokens` more, up to the brace that closes the cue's `{` (a cue
  without an open brace ends at the end of its line); samples finishing within B are untouched.

A prompt whose request the backend refuses (an `--engine openai` server's 400/413/422, e.g. a
prompt over the server's context) is a `request_refused` reject carrying the server's `error`; the
other prompts go on.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.engine.types import Request, Result, SamplingParams
from cpmtool.errors import ConfigError, InputError
from cpmtool.io import Reject, RunStats, run_stream
from cpmtool.rewards import load_reward
from cpmtool.rewards.math import extract_answer, gold_answer, math_reward
from cpmtool.rewards.vote import majority, vote_rewards

BUDGET_MODES = ("truncate", "force-answer")
DEFAULT_ANSWER_CUE = "\nFinal answer: \\boxed{"
STATE_FORMAT = "cpmtool-rollout-state"


@dataclass
class Prompt:
    """One accepted input record and the request made from it."""

    record: dict
    group: str
    position: tuple[str, int]
    request: Request
    query: dict  # {"messages": [...]} or {"prompt": "..."}: what was asked, for aggregation prompts


def refused(p: Prompt, result: Result) -> Reject:
    """The reject of a prompt whose request the backend refused (an `--engine openai` server's
    400, e.g. a prompt over its context), carrying the server's message."""
    return Reject(dict(p.record, error=result.error), "request_refused", p.position)


@dataclass
class Trajectory:
    """One sample as it grows: its tokens, behaviour log-probs and, once finished, its text."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    extra: dict = field(default_factory=dict)


def rollout(
    inputs: str | Path | list,
    output: str | Path = "-",
    *,
    model: str | None = "cpm-tiny",
    engine="native",
    api_base: str | None = None,
    api_key: str | None = None,
    n: int = 1,
    max_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: tuple[str, ...] | list[str] = (),
    logprobs: bool = False,
    reward: str = "none",
    answer_field: str = "answer",
    prompt_field: str = "prompt",
    chat: bool = False,
    vote: bool = False,
    chunk_tokens: int | None = None,
    state: str | Path | None = None,
    policy_version: int = 0,
    aggregate: int | None = None,
    layers: int = 1,
    aggregator_prompt: str | None = None,
    budget: int | None = None,
    budget_mode: str = "truncate",
    answer_cue: str = DEFAULT_ANSWER_CUE,
    answer_tokens: int = 16,
    max_batch: int = 64,
    rejects: str | Path | None = None,
    stats_path: str | Path | None = None,
    strict: bool = False,
    progress: bool | None = None,
) -> RunStats:
    """Sample `n` completions for every prompt record of `inputs` and write sample records to `output`.

    Args:
        inputs: JSONL paths or `-`; may be empty in chunk mode to only continue the state file.
        output: JSONL path or `-` (stdout).
        model: registry name, HF directory or .gguf (native/vllm); the served model name (openai).
        engine: "native" | "vllm" | "openai", or an engine object (generate/generate_stream).
        api_base, api_key: for the openai engine.
        n, max_tokens, temperature, top_p, top_k, min_p, seed, stop: sampling (temperature 0 is
            greedy). With a seed, each prompt's samples are drawn from seeds derived from the seed
            and the prompt id, so a prompt gets the same samples whatever else is in the batch.
        logprobs: also write `token_ids` and `logprobs`.
        reward: "math" | "ifeval" | "none" | "module:function" (`cpmtool.rewards.load_reward`).
        answer_field: the record field that holds the gold answer.
        prompt_field: the record field that holds a plain prompt (e.g. `question` for GSM8K).
        chat: render a plain prompt as one user turn with the chat template.
        vote: TTRL majority-vote rewards (reward must be "math" or "none").
        chunk_tokens, state, policy_version: chunk-wise rollout; `state` is the JSON state file.
        aggregate, layers: AFT propose-and-aggregate with `aggregate` proposals and `layers` steps.
        aggregator_prompt: replaces the aggregator instruction (`cpmtool.data.aggregate`).
        budget, budget_mode, answer_cue, answer_tokens: token budget B, "truncate" or "force-answer".
        max_batch: sequences decoded together (native engine).
        rejects, stats_path, strict, progress: as in `cpmtool.io.run_stream`.

    Returns:
        The run's RunStats (`in` counts prompt records, `out` sample records).

    Raises:
        ConfigError: conflicting or invalid settings. InputError: a bad state file.
    """
    _check(n=n, reward=reward, vote=vote, chunk_tokens=chunk_tokens, state=state, aggregate=aggregate,
           layers=layers, budget=budget, budget_mode=budget_mode, answer_tokens=answer_tokens)
    if budget is not None:
        max_tokens = min(max_tokens, budget)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            max_tokens=max_tokens, stop=tuple(stop), seed=seed,
                            logprobs=0 if logprobs or chunk_tokens else None)
    reward_fn = load_reward("none" if vote else reward, answer_field=answer_field)
    saved = load_state(state) if chunk_tokens and state and Path(state).exists() else []
    if isinstance(engine, str):
        from cpmtool.engine import load_engine

        engine = load_engine(model, engine, api_base=api_base, api_key=api_key, max_batch=max_batch)
    run = _Run(engine, params, reward_fn, vote=vote, logprobs=logprobs, answer_field=answer_field,
               prompt_field=prompt_field, chat=chat, max_batch=max_batch)
    stats = RunStats()
    run.stats = stats
    if chunk_tokens:
        stage = run.chunked(saved, chunk_tokens, Path(state), policy_version)
    elif aggregate:
        from cpmtool.data.aggregate import aggregate_stage

        stage = aggregate_stage(run, aggregate, layers, aggregator_prompt)
    elif budget is not None and budget_mode == "force-answer":
        stage = run.forced(answer_cue, answer_tokens)
    else:
        stage = run.plain
    paths = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    return run_stream(paths, output, stage, rejects=rejects, stats_path=stats_path, strict=strict,
                      progress=progress, stats=stats)


def _check(*, n, reward, vote, chunk_tokens, state, aggregate, layers, budget, budget_mode, answer_tokens):
    problems = []
    if n < 1:
        problems.append(f"--n must be >= 1 (got {n})")
    if vote and reward not in ("none", "math"):
        problems.append(f"--vote rewards agreement with the majority answer; it cannot be combined with "
                        f"--reward {reward}")
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            problems.append(f"--chunk-tokens must be >= 1 (got {chunk_tokens})")
        if state is None:
            problems.append("--chunk-tokens needs --state FILE to keep unfinished trajectories")
        if aggregate:
            problems.append("--chunk-tokens cannot be combined with --aggregate")
    elif state is not None:
        problems.append("--state is only used with --chunk-tokens")
    if aggregate is not None and aggregate < 1:
        problems.append(f"--aggregate must be >= 1 (got {aggregate})")
    if layers < 1:
        problems.append(f"--layers must be >= 1 (got {layers})")
    if budget is not None and budget < 1:
        problems.append(f"--budget must be >= 1 (got {budget})")
    if budget_mode not in BUDGET_MODES:
        problems.append(f"--budget-mode must be one of {', '.join(BUDGET_MODES)} (got {budget_mode!r})")
    if budget is not None and budget_mode == "force-answer" and (chunk_tokens or aggregate):
        problems.append("--budget-mode force-answer cannot be combined with --chunk-tokens or --aggregate")
    if answer_tokens < 1:
        problems.append(f"--answer-tokens must be >= 1 (got {answer_tokens})")
    if problems:
        raise ConfigError(problems)


def derive_seed(seed: int | None, *parts) -> int | None:
    """A seed for one request, stable across runs and batch compositions: crc32 of seed and parts."""
    if seed is None:
        return None
    return zlib.crc32(":".join(str(p) for p in (seed, *parts)).encode())


# ---------------------------------------------------------------- records in


def prompt_of(record: dict, prompt_field: str = "prompt", chat: bool = False) -> dict | str:
    """What a record asks: `{"messages": [...]}` or `{"prompt": "..."}`, or a reject reason.

    Reasons: `no_prompt` (neither field), `bad_messages` (not a non-empty list of
    {"role": str, "content": str}), `bad_prompt` (not a string), `empty_prompt`.
    """
    msgs = record.get("messages")
    if msgs is not None:
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)
        return {"messages": msgs} if ok else "bad_messages"
    text = record.get(prompt_field)
    if text is None:
        return "no_prompt"
    if not isinstance(text, str):
        return "bad_prompt"
    if not text.strip():
        return "empty_prompt"
    return {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}


class _Run:
    """The settings of one rollout and the stages built on them."""

    def __init__(self, engine, params: SamplingParams, reward_fn, *, vote, logprobs, answer_field,
                 prompt_field, chat, max_batch):
        self.engine = engine
        self.params = params
        self.reward_fn = reward_fn
        self.vote = vote
        self.logprobs = logprobs
        self.answer_field = answer_field
        self.prompt_field = prompt_field
        self.chat = chat
        self.max_batch = max_batch
        self.stats: RunStats | None = None
        self.counter = 0
        self.tokenizes = hasattr(engine, "encode") and hasattr(engine, "decode")
        model = getattr(engine, "model", None)
        self.max_len = getattr(engine, "max_len", None) or (
            model.config.max_position_embeddings if model is not None and hasattr(model, "config") else None)

    # -- requests ------------------------------------------------------------------------------
    def prepare(self, record: dict, params: SamplingParams | None = None) -> Prompt | Reject:
        """A Prompt for `record`, or a Reject with its reason and input position."""
        position = self.stats.position
        query = prompt_of(record, self.prompt_field, self.chat)
        if isinstance(query, str):
            return Reject(record, query, position)
        group = str(record["id"])
        params = (params or self.params).with_(seed=derive_seed(self.params.seed, group))
        self.counter += 1
        rid = f"{self.counter}"
        req = self.make_request(query, params, rid)
        if isinstance(req, str):
            return Reject(record, req, position)
        return Prompt(record, group, position, req, query)

    def make_request(self, query: dict, params: SamplingParams, rid: str) -> Request | str:
        """A request for a query; token ids when the engine tokenizes, so a too-long prompt is a reject."""
        req = Request(**query, params=params, id=rid)
        if not self.tokenizes:
            return req
        ids = self.engine.encode(req)
        if not ids:
            return "empty_prompt"
        if self.max_len is not None and len(ids) + 1 > self.max_len:
            return "prompt_too_long"
        return Request(prompt_ids=ids, params=params, id=rid)

    def need_tokens(self, what: str) -> None:
        if not self.tokenizes:
            raise ConfigError(f"{what} needs an engine that works on token ids (native or vllm), "
                              f"not {getattr(self.engine, 'name', type(self.engine).__name__)}")

    # -- records out ---------------------------------------------------------------------------
    def group_records(self, p: Prompt, trajs: list[Trajectory], extra: dict | None = None) -> list[dict]:
        """The sample records of one finished group: rewards, the vote, the optional fields."""
        texts = [t.text or "" for t in trajs]
        if self.vote:
            answers = [extract_answer(t) for t in texts]
            v = majority(answers)
            agree = vote_rewards(answers, v)
            has_gold = gold_answer(p.record.get(self.answer_field)) is not None
            grades = [math_reward(p.record, t, answer_field=self.answer_field) for t in texts]
            scored = [(agree[j], grades[j][1]) for j in range(len(trajs))]
        else:
            scored = [self.reward_fn(p.record, t) for t in texts]
        out = []
        for j, (t, (rew, ok)) in enumerate(zip(trajs, scored, strict=True)):
            rec = dict(p.record)
            rec.update(id=f"{p.group}-{j}", completion=texts[j], group=p.group, sample=j, reward=rew,
                       correct=ok, finish_reason=t.finish_reason or "length", n_tokens=len(t.token_ids))
            if self.vote:
                rec.update(maj_answer=v.answer, maj_ratio=v.ratio)
                if has_gold:
                    rec["maj_correct"] = v.answer is not None and bool(
                        math_reward(p.record, f"\\boxed{{{v.answer}}}", answer_field=self.answer_field)[1])
            if self.logprobs:
                rec.update(token_ids=list(t.token_ids), logprobs=list(t.logprobs))
            rec.update(t.extra)
            if extra:
                rec.update(extra)
            out.append(rec)
        return out

    # -- plain ---------------------------------------------------------------------------------
    def plain(self, records: Iterator[dict]) -> Iterator[dict | Reject]:
        """Stream: the engine pulls requests lazily and hands back groups as they finish."""
        pending: dict[str, Prompt] = {}
        side: deque[Reject] = deque()

        def requests() -> Iterator[Request]:
            for rec in records:
                p = self.prepare(rec)
                if isinstance(p, Reject):
                    side.append(p)
                    continue
                pending[p.request.id] = p
                yield p.request

        for result in self.engine.generate_stream(requests()):
            while side:
                yield side.popleft()
            p = pending.pop(result.id)
            if result.error is not None:
                yield refused(p, result)
                continue
            yield from self.group_records(p, [trajectory_of(c) for c in result.completions])
        while side:
            yield side.popleft()

    def batches(self, records: Iterator[dict], width: int) -> Iterator[tuple[list[Prompt], list[Reject]]]:
        """Accepted prompts in batches that fill about `max_batch` sequences of `width` samples each."""
        size = max(1, self.max_batch // max(width, 1))
        batch: list[Prompt] = []
        rejected: list[Reject] = []
        for rec in records:
            p = self.prepare(rec)
            if isinstance(p, Reject):
                rejected.append(p)
            else:
                batch.append(p)
            if len(batch) >= size:
                yield batch, rejected
                batch, rejected = [], []
        if batch or rejected:
            yield batch, rejected

    # -- budget forcing ------------------------------------------------------------------------
    def forced(self, cue: str, answer_tokens: int):
        self.need_tokens("--budget-mode force-answer")
        cue_ids = self.engine.encode(Request(prompt=cue))
        closer = "}" if cue.count("{") > cue.count("}") else "\n"

        def stage(records: Iterator[dict]) -> Iterator[dict | Reject]:
            for batch, rejected in self.batches(records, self.params.n):
                yield from rejected
                results = self.engine.generate([p.request for p in batch])
                yield from (refused(p, r) for p, r in zip(batch, results, strict=True) if r.error is not None)
                batch = [p for p, r in zip(batch, results, strict=True) if r.error is None]
                results = [r for r in results if r.error is None]
                trajs = [[trajectory_of(c) for c in r.completions] for r in results]
                cut = [(p, r, j, t) for p, r, ts in zip(batch, results, trajs, strict=True)
                       for j, t in enumerate(ts) if t.finish_reason == "length"]
                self.force_answers(cut, cue, cue_ids, closer, answer_tokens)
                for p, ts in zip(batch, trajs, strict=True):
                    for t in ts:
                        t.extra.setdefault("budget_forced", False)
                    yield from self.group_records(p, ts)

        return stage

    def force_answers(self, cut: list[tuple[Prompt, Result, int, Trajectory]], cue: str, cue_ids: list[int],
                      closer: str, answer_tokens: int) -> None:
        """Append the cue to each budget-cut trajectory and generate its answer, in place.

        The answer is generated in rounds that stop at `closer`; a `}` that closes an inner brace
        (`\\frac{1}{2}`) starts another round, until the cue's brace is closed, EOS, or
        `answer_tokens` are spent.
        """
        ids: dict[int, list[int]] = {id(t): [] for *_, t in cut}
        lps: dict[int, list[float | None]] = {id(t): [] for *_, t in cut}
        open_ = list(cut)
        while open_:
            reqs = []
            for k, (p, r, j, t) in enumerate(open_):
                got = ids[id(t)]
                params = p.request.params.with_(
                    n=1, max_tokens=answer_tokens - len(got), stop=(closer, *p.request.params.stop),
                    seed=derive_seed(self.params.seed, p.group, "answer", j, len(got)))
                reqs.append(Request(prompt_ids=r.prompt_ids + t.token_ids + cue_ids + got, params=params,
                                    id=str(k)))
            still = []
            for (p, r, j, t), res in zip(open_, self.engine.generate(reqs), strict=True):
                # a refused answer round ends the answer where it stands (finish_reason "length")
                c = res.completions[0] if res.error is None else None
                got = ids[id(t)]
                if c is not None:
                    got += c.token_ids
                    lps[id(t)] += list(c.logprobs) if c.logprobs is not None else [None] * len(c.token_ids)
                text = self.engine.decode(got)
                end = _closing(text, closer)
                eos = c is not None and c.finish_reason == "stop" and not isinstance(c.stop_reason, str)
                if c is not None and end is None and not eos and len(got) < answer_tokens and c.token_ids:
                    still.append((p, r, j, t))
                    continue
                t.text = self.engine.decode(t.token_ids) + cue + (text[:end] if end is not None else text)
                t.token_ids = t.token_ids + cue_ids + got
                t.logprobs = t.logprobs + [None] * len(cue_ids) + lps[id(t)]
                t.finish_reason = "stop" if end is not None or eos else "length"
                t.extra["budget_forced"] = True
            open_ = still

    # -- chunk-wise ----------------------------------------------------------------------------
    def chunked(self, saved: list[dict], chunk: int, state: Path, version: int):
        self.need_tokens("--chunk-tokens")

        def stage(records: Iterator[dict]) -> Iterator[dict | Reject]:
            groups: dict[str, _ChunkGroup] = {}
            side: deque[Reject] = deque()

            def requests() -> Iterator[Request]:
                for g in saved:  # continue the saved trajectories first: they are the oldest
                    cg = _ChunkGroup.from_state(g, self.params)
                    groups[cg.key] = cg
                    for j, t in enumerate(cg.trajs):
                        if t.finish_reason is None:
                            yield self.resume_request(cg, j, chunk)
                for rec in records:
                    p = self.prepare(rec, self.params.with_(max_tokens=min(chunk, self.params.max_tokens)))
                    if isinstance(p, Reject):
                        side.append(p)
                        continue
                    cg = _ChunkGroup(p, [Trajectory() for _ in range(self.params.n)], None, key=p.request.id)
                    groups[cg.key] = cg
                    yield p.request

            try:
                for result in self.engine.generate_stream(requests()):
                    while side:
                        yield side.popleft()
                    key, _, j = result.id.partition("#")
                    cg = groups.get(key)
                    if cg is None:  # a sample of a group already refused
                        continue
                    if result.error is not None:  # the whole group goes, saved samples included
                        del groups[key]
                        yield refused(cg.prompt, result)
                        continue
                    if cg.prompt_ids is None:
                        cg.prompt_ids = list(result.prompt_ids)
                    for c in result.completions:
                        self.extend(cg, int(j) if j else c.index, c, chunk, version)
                    if cg.done:
                        del groups[key]
                        yield from self.group_records(cg.prompt, [self.finish_text(t) for t in cg.trajs])
                while side:
                    yield side.popleft()
            finally:
                # also when interrupted: what has been extended is kept; a new prompt whose first
                # chunk never came back has nothing to keep yet
                save_state(state, [g.to_state() for g in groups.values() if g.prompt_ids is not None])

        return stage

    def resume_request(self, cg: _ChunkGroup, j: int, chunk: int) -> Request:
        t = cg.trajs[j]
        left = self.params.max_tokens - len(t.token_ids)
        params = self.params.with_(n=1, max_tokens=min(chunk, left),
                                   seed=derive_seed(self.params.seed, cg.group, j, len(t.extra["chunks"])))
        return Request(prompt_ids=cg.prompt_ids + t.token_ids, params=params, id=f"{cg.key}#{j}")

    def extend(self, cg: _ChunkGroup, j: int, c, chunk: int, version: int) -> None:
        """Append one chunk's tokens to trajectory j and decide whether it has finished."""
        t = cg.trajs[j]
        before = len(t.token_ids)
        asked = min(chunk, self.params.max_tokens - before)
        t.token_ids += c.token_ids
        t.logprobs += list(c.logprobs) if c.logprobs is not None else [None] * len(c.token_ids)
        t.extra.setdefault("chunks", []).append({"policy_version": version, "n_tokens": len(c.token_ids)})
        if c.finish_reason == "stop" and not isinstance(c.stop_reason, str):
            t.finish_reason, t.stop_reason = "stop", c.stop_reason
            return
        if self.params.stop and self.stop_in(t, before):
            return
        if len(t.token_ids) >= self.params.max_tokens or len(c.token_ids) < asked:
            t.finish_reason = "length"  # the budget, or the engine's context limit cut it short

    def stop_in(self, t: Trajectory, before: int) -> bool:
        """Find a stop string in the text so far (it may span a chunk boundary) and drop the tokens
        after the first one that completes it, where an uninterrupted run would have stopped."""
        stops = self.params.stop
        if not any(s in self.engine.decode(t.token_ids) for s in stops):
            return False
        for k in range(before + 1, len(t.token_ids) + 1):
            prefix = self.engine.decode(t.token_ids[:k])
            hits = [(prefix.find(s), s) for s in stops if s in prefix]
            if hits:
                at, s = min(hits)
                t.extra["chunks"][-1]["n_tokens"] -= len(t.token_ids) - k
                del t.token_ids[k:], t.logprobs[k:]
                t.finish_reason, t.stop_reason, t.text = "stop", s, prefix[:at]
                return True
        return False

    def finish_text(self, t: Trajectory) -> Trajectory:
        if t.text is None:
            t.text = self.engine.decode(t.token_ids)
        return t


def trajectory_of(c) -> Trajectory:
    return Trajectory(list(c.token_ids), list(c.logprobs) if c.logprobs is not None else [], c.text,
                      c.finish_reason, c.stop_reason)


def _closing(text: str, closer: str) -> int | None:
    """Index just past the `}` that closes the cue's open brace, or past the first newline."""
    if closer == "\n":
        at = text.find("\n")
        return None if at < 0 else at
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


# ---------------------------------------------------------------- chunk state


@dataclass
class _ChunkGroup:
    prompt: Prompt
    trajs: list[Trajectory]
    prompt_ids: list[int] | None
    key: str

    @property
    def group(self) -> str:
        return self.prompt.group

    @property
    def done(self) -> bool:
        return all(t.finish_reason is not None for t in self.trajs)

    def to_state(self) -> dict:
        return {
            "record": self.prompt.record,
            "group": self.group,
            "prompt_ids": self.prompt_ids,
            "samples": [
                {"token_ids": t.token_ids, "logprobs": t.logprobs, "chunks": t.extra.get("chunks", []),
                 "finish_reason": t.finish_reason, "stop_reason": t.stop_reason, "text": t.text}
                for t in self.trajs
            ],
        }

    @classmethod
    def from_state(cls, g: dict, params: SamplingParams) -> _ChunkGroup:
        record = g["record"]
        prompt = Prompt(record, g["group"], ("<state>", 0), Request(prompt_ids=g["prompt_ids"], params=params),
                        {})
        trajs = [Trajectory(list(s["token_ids"]), list(s["logprobs"]), s.get("text"), s.get("finish_reason"),
                            s.get("stop_reason"), {"chunks": list(s.get("chunks", []))}) for s in g["samples"]]
        return cls(prompt, trajs, list(g["prompt_ids"]), key=f"state{id(g)}")


def load_state(path: str | Path) -> list[dict]:
    """The saved groups of a chunk-rollout state file.

    Raises:
        InputError: the file is not a rollout state file.
    """
    import orjson

    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the rollout state: {e}") from e
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or not isinstance(data.get("groups"), list):
        raise InputError(f"{path}: not a rollout state file (expected format {STATE_FORMAT!r})")
    for g in data["groups"]:
        if not (isinstance(g, dict) and isinstance(g.get("record"), dict) and isinstance(g.get("prompt_ids"), list)
                and isinstance(g.get("samples"), list) and g["samples"]):
            raise InputError(f"{path}: a group of the rollout state is malformed")
    return data["groups"]


def save_state(path: str | Path, groups: Iterable[dict]) -> None:
    """Write the unfinished groups atomically (temp file + rename); remove the file when there are none."""
    import orjson

    groups = list(groups)
    path = Path(path)
    if not groups:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(orjson.dumps({"format": STATE_FORMAT, "version": 1, "groups": groups}))
    os.replace(tmp, path)
