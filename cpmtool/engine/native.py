"""The native engine: batched generation on our `Transformer` with a preallocated KV cache.

A `Scheduler` owns the running batch. `add()` queues a request; each `step()` first admits queued
requests while there is room (one batched prefill of their prompts, each prompt prefilled once and
its KV fanned out to its n samples), then runs one decode step for every running sequence.
Finished rows are dropped from the cache (compaction), so the batch only pays for live sequences.
`generate_stream` and `serve` both drive a Scheduler; continuous batching falls out of it: a new
request joins between two decode steps.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from cpmtool.engine.sampling import sample, token_logprobs
from cpmtool.engine.types import Completion, Request, Result, SamplingParams
from cpmtool.errors import ConfigError
from cpmtool.model.transformer import KVCache


@dataclass
class _Seq:
    req: _Req
    index: int  # sample index within the request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None
    draws: list[float] = field(default_factory=list)  # the generator's next uniforms, the next one last

    @property
    def pos(self) -> int:  # position of the next token to feed
        return len(self.req.prompt_ids) + len(self.tokens) - 1

    def uniform(self) -> float:
        """The next float64 uniform of this sequence's generator, drawn a block at a time: a block
        fills serially from the generator (torch's CPU uniform_), so these are the numbers, in the
        order, that one draw per token gives, at a fraction of the per-call cost. The block is the
        tokens left to generate, at most UNIFORM_BLOCK."""
        if not self.draws:
            n = max(1, min(UNIFORM_BLOCK, self.req.params.max_tokens - len(self.tokens)))
            self.draws = torch.rand(n, dtype=torch.float64, generator=self.generator).tolist()[::-1]
        return self.draws.pop()


# A sampled row draws one uniform per token from its own generator (`sampling.categorical`); one
# torch.rand call each costs ~2 us, ~120 us a step at 64 rows. Drawing ahead in blocks gives the same
# numbers for one call per block.
UNIFORM_BLOCK = 64


@dataclass
class _Req:
    request: Request
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq] = field(default_factory=list)
    stop_ids: frozenset = frozenset()

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


@dataclass
class TokenEvent:
    """One new token of one sequence, for token-level streaming (serve)."""

    request: Request
    index: int
    token_id: int
    finished: bool
    seq: _Seq


# Prompts prefilled together are right-padded to the longest; a group is closed when padding
# would exceed this share of its real tokens (vLLM packs variable-length prompts instead, which
# needs a varlen attention kernel; bucketing gets most of the saving with the dense one).
PREFILL_PAD_WASTE = 0.25


def _length_groups(batch: list[_Req]) -> list[list[_Req]]:
    """Split an admission into prefill groups of similar prompt length (shortest first)."""
    groups: list[list[_Req]] = []
    cur: list[_Req] = []
    real = 0
    for r in sorted(batch, key=lambda r: len(r.prompt_ids)):
        n = len(r.prompt_ids)  # the longest so far: the group's padded width if r joins
        if cur and n * (len(cur) + 1) > (1 + PREFILL_PAD_WASTE) * (real + n):
            groups.append(cur)
            cur, real = [], 0
        cur.append(r)
        real += n
    if cur:
        groups.append(cur)
    return groups


class Scheduler:
    """Continuous batching over one model. Not thread-safe: drive it from one thread."""

    # sampled rows take their uniforms from `_Seq.uniform` (blocks); a subclass that draws from the
    # generators itself (speculative decoding's acceptance tests) turns it off
    draw_ahead = True
    # decode steps as CUDA graphs where the engine allows them (engine.cuda_graphs); a subclass whose
    # decode step has other shapes (speculative verification) turns it off
    use_graphs = True

    def __init__(self, engine: NativeEngine, max_batch: int = 64, max_len: int | None = None):
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        cfg = self.model.config
        self.max_len = max_len or cfg.max_position_embeddings
        self.waiting: deque[_Req] = deque()
        # the cache's rows in order; with CUDA graphs finished rows may stay until _compact drops them
        self.running: list[_Seq] = []
        self.cache = None
        self.graphs = None
        if self.use_graphs and engine.graphs_enabled:
            from cpmtool.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, capture=engine.device.type == "cuda")

    # -- queue -------------------------------------------------------------------------------
    def add(self, request: Request, params: SamplingParams | None = None) -> _Req:
        params = params or request.params
        ids = self.engine.encode(request)
        if not ids:
            raise ConfigError(f"request {request.id!r}: empty prompt")
        if len(ids) + 1 > self.max_len:
            raise ConfigError(f"request {request.id!r}: prompt of {len(ids)} tokens exceeds the maximum "
                              f"length {self.max_len}")
        if len(ids) + params.max_tokens > self.max_len:
            params = params.with_(max_tokens=self.max_len - len(ids))
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.engine.eos_ids
        req = _Req(request, ids, params, stop_ids=frozenset(stop_ids))
        for j in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed((params.seed * 1_000_003 + j) % (2**63))
            req.seqs.append(_Seq(req, j, gen))
        self.waiting.append(req)
        return req

    def abort(self, req: _Req) -> None:
        """Free a request's rows (a client went away)."""
        if req in self.waiting:
            self.waiting.remove(req)
        for s in req.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        self._compact()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        events = self._admit()
        self._compact(lazy=True)  # a sequence may end on its first token
        if self.running:
            events += self._decode()
            self._compact(lazy=True)
        return events

    def _admit(self) -> list[TokenEvent]:
        if self.waiting:  # finished rows kept for the graphs would take room from new ones
            self._compact()
        batch: list[_Req] = []
        room = self.max_batch - len(self.running)
        while self.waiting and (not batch or room >= self.waiting[0].params.n) and \
                (room >= self.waiting[0].params.n or not self.running):
            req = self.waiting.popleft()
            batch.append(req)
            room -= req.params.n
        events: list[TokenEvent] = []
        for group in _length_groups(batch):
            events += self._prefill(group)
        return events

    def _prefill(self, batch: list[_Req]) -> list[TokenEvent]:
        lens = [len(r.prompt_ids) for r in batch]
        t = max(lens)
        dev = self.engine.device
        ids = torch.tensor([r.prompt_ids + [0] * (t - len(r.prompt_ids)) for r in batch], device=dev)  # (U, T)
        positions = torch.arange(t, device=dev).expand(len(batch), t)
        # size the cache for this admission only; _merge pads when later requests need more room
        need = max(len(r.prompt_ids) + r.params.max_tokens for r in batch)
        cache = self.model.new_cache(len(batch), need)
        hidden = self.model.hidden_states(ids, positions, cache, lengths=lens)  # (U, T, hidden)
        # right padding wrote junk past each prompt: invalidate it; decode overwrites those slots
        for u, n in enumerate(lens):
            cache.valid[u, n:] = False
        # the LM head on the last prompt position only: on all T it costs more than the whole prefill
        last = self.model.logits(hidden[torch.arange(len(batch)), torch.tensor(lens) - 1]).float()  # (U, V)
        fan = torch.tensor([u for u, r in enumerate(batch) for _ in r.seqs], device=dev)
        cache.select_rows(fan)
        last = last.index_select(0, fan)
        seqs = [s for r in batch for s in r.seqs]
        events = self._sample_append(seqs, last)
        self._merge(cache, seqs)
        return events

    def _merge(self, cache, seqs: list[_Seq]) -> None:
        if self.cache is None or not self.running:
            self.cache, self.running = cache, list(seqs)
            return
        self.cache.append_rows(cache)
        self.running += seqs

    def _decode(self) -> list[TokenEvent]:
        dev = self.engine.device
        seqs = self.running
        if self.graphs is not None and type(self.cache) is KVCache and not self.cache.extra:
            logits = self.graphs.logits(self.cache, [s.tokens[-1] for s in seqs], [s.pos for s in seqs])  # (B, V)
        else:
            ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # (B, 1)
            pos = torch.tensor([[s.pos] for s in seqs], device=dev)  # (B, 1)
            logits = self.model.logits(self.model.hidden_states(ids, pos, self.cache)[:, -1]).float()  # (B, V)
        # a finished row kept in the batch (_compact(lazy=True)) re-fed its last token at its last
        # position, the same K/V into the same slot; its logits are dropped
        live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if len(live) < len(seqs):
            return self._sample_append([seqs[i] for i in live], logits.cpu()[live])
        return self._sample_append(seqs, logits)

    def _sample_append(self, seqs: list[_Seq], logits: torch.Tensor) -> list[TokenEvent]:
        # sampling runs on the CPU whatever the model's device: the per-request seeded generators are
        # CPU generators (a seed gives the same tokens on any device) and each token is read back anyway
        logits = logits.cpu()
        ps = [s.req.params for s in seqs]
        knobs = {(p.temperature, p.top_k, p.top_p, p.min_p) for p in ps}
        if len(knobs) == 1:  # one setting for every row (a rollout): four fills, not four list walks
            (t_, k_, p_, m_), n = next(iter(knobs)), len(ps)
            temp, top_p, min_p = (torch.full((n,), float(x)) for x in (t_, p_, m_))
            top_k = torch.full((n,), int(k_))
        else:
            temp = torch.tensor([p.temperature for p in ps])
            top_k = torch.tensor([p.top_k for p in ps])
            top_p = torch.tensor([p.top_p for p in ps])
            min_p = torch.tensor([p.min_p for p in ps])
        uniforms = None
        if self.draw_ahead:  # the sampled rows' uniforms, from their generators' blocks
            uniforms = [s.uniform() if s.generator is not None and p.temperature > 0 else None
                        for s, p in zip(seqs, ps, strict=True)]
        nxt = sample(logits, temp, top_k, top_p, min_p, [s.generator for s in seqs], uniforms)
        want_lp = [p.logprobs is not None for p in ps]
        lp = top_v = top_i = None
        if any(want_lp):
            k = max((p.logprobs or 0) for p in ps)
            lp, top_v, top_i = token_logprobs(logits, nxt, k)
            lp = lp.tolist()
        events = []
        for b, (s, tok) in enumerate(zip(seqs, nxt.tolist(), strict=True)):
            s.tokens.append(tok)
            if want_lp[b]:
                s.logprobs.append(lp[b])
                if s.req.params.logprobs:
                    k = s.req.params.logprobs
                    s.top.append(dict(zip(top_i[b, :k].tolist(), top_v[b, :k].tolist(), strict=True)))
            self._check_stop(s, tok)
            events.append(TokenEvent(s.req.request, s.index, tok, s.finish_reason is not None, s))
        return events

    def _check_stop(self, s: _Seq, tok: int) -> None:
        p = s.req.params
        if tok in s.req.stop_ids:
            s.finish_reason, s.stop_reason = "stop", tok
        elif p.stop:
            text = self.engine.decode(s.tokens)
            hits = [(text.find(x), x) for x in p.stop if x in text]
            if hits:
                at, x = min(hits)
                s.finish_reason, s.stop_reason, s.text = "stop", x, text[:at]
                return
        if s.finish_reason is None and len(s.tokens) >= p.max_tokens:
            s.finish_reason = "length"

    def _compact(self, lazy: bool = False) -> None:
        """Drop finished rows from the batch and the cache. `lazy`, with CUDA graphs: only once at
        least half the rows are done, since every new batch shape is a new capture."""
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        if len(keep) == len(self.running):
            return
        if lazy and self.graphs is not None and keep and 2 * len(keep) > len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if keep:
            self.cache.select_rows(torch.tensor(keep, device=self.engine.device))
        else:
            self.cache = None


class NativeEngine:
    """Generation on our own model, in-process (the default backend)."""

    name = "native"

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_len: int | None = None, speculative=None,
                 cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len
        self.device = next(model.parameters()).device
        # decode steps replayed as CUDA graphs (engine/cuda_graphs.py): on a GPU, for dense attention.
        # cuda_graphs=False, or CPMTOOL_CUDA_GRAPHS=0 in the environment, runs every step eagerly (as
        # vLLM's enforce_eager does): for profiling, or a model whose step cannot be captured
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("CPMTOOL_CUDA_GRAPHS", "1") != "0"
        self.graphs_enabled = cuda_graphs and self.device.type == "cuda" and model.config.attention == "dense"
        eos = set(model.config.eos_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        # speculative decoding (a cpmtool.engine.speculative.SpecConfig): decode steps draft and verify
        self.speculative = None
        if speculative is not None:
            from cpmtool.engine.speculative import Speculator

            self.speculative = Speculator(self, speculative)

    @classmethod
    def load(cls, model: str, *, dtype: str = "float32", device: str = "cpu", attention: str | None = None,
             **kw) -> NativeEngine:
        from cpmtool.model.loader import load_model
        from cpmtool.model.tokenizer import load_tokenizer

        m, _ = load_model(model, dtype=dtype, device=device, attention=attention)
        return cls(m, load_tokenizer(model), **kw)

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, request: Request) -> list[int]:
        return request.encode(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation ---------------------------------------------------------------------------
    def scheduler(self, max_len: int | None = None) -> Scheduler:
        if self.speculative is not None:
            return self.speculative.scheduler(self, self.max_batch, max_len or self.max_len)
        return Scheduler(self, self.max_batch, max_len or self.max_len)

    def generate_stream(self, requests: Iterable[Request], params: SamplingParams | None = None) -> Iterator[Result]:
        """Results in the order requests finish; at most `max_batch` sequences run at once, and the
        input is consumed lazily so a long stream of prompts never sits in memory at once."""
        it = iter(requests)
        sched = self.scheduler()
        pending: list[_Req] = []
        exhausted = False
        while True:
            while not exhausted and len(sched.waiting) + len(sched.running) < 2 * self.max_batch:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.append(sched.add(nxt, params))
            if not sched.has_work:
                break
            sched.step()
            for r in [r for r in pending if r.done]:
                pending.remove(r)
                yield self._result(r)

    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> list[Result]:
        """Results in request order."""
        sched = self.scheduler()
        reqs = [sched.add(r, params) for r in requests]
        while sched.has_work:
            sched.step()
        return [self._result(r) for r in reqs]

    def _result(self, r: _Req) -> Result:
        comps = []
        for s in r.seqs:
            text = s.text if s.text is not None else self.decode(s.tokens)
            comps.append(Completion(
                index=s.index, text=text, token_ids=list(s.tokens), finish_reason=s.finish_reason or "length",
                logprobs=list(s.logprobs) if r.params.logprobs is not None else None,
                top_logprobs=list(s.top) if r.params.logprobs else None, stop_reason=s.stop_reason,
            ))
        return Result(id=r.request.id, prompt_ids=r.prompt_ids, completions=comps)
