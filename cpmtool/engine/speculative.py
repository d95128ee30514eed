"""Speculative decoding for the native engine: prompt lookup (n-gram) or a draft model, optionally
with an FR-Spec (frequency-ranked) draft vocabulary.

Each decode step a drafter proposes up to k tokens per running row; the target scores the last
token plus all k proposals in one forward pass over the KV cache, positions (B, k+1); each row
then keeps the longest accepted prefix plus one token from the target, by the standard rule
(Leviathan et al. 2023, Chen et al. 2023):

    accept x_t with probability min(1, p_t(x_t) / q_t(x_t));
    on the first rejection emit x ~ norm(max(0, p_t - q_t)) and stop;
    when all are accepted emit a bonus x ~ p_{k+1}.

so every emitted token is an exact sample of the target distribution p (the tempered and
top-k/top-p/min-p filtered one the plain engine samples from). Prompt lookup has no draft
distribution: its proposal is a point mass (q(x) = 1), so acceptance is with probability p(x) and
the residual is p with x removed. At temperature 0 p is one-hot: a draft token is kept iff it is
the target's argmax, and the text equals plain greedy decoding.

The target's cache slots written for rejected or padded proposals are marked invalid
(`KVCache.valid`); they are overwritten when the row really reaches those positions. The draft
model keeps its own cache, aligned with the scheduler's running rows before every step.

Draft models: a registry name / HF directory with the target's tokenizer, or `self:N`, the first N
layers of the target itself with its final norm and LM head (an early-exit draft that shares the
target's weights: no extra memory, and the only same-tokenizer draft smollm2-135m has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpmtool.engine.native import Scheduler, TokenEvent, _Seq
from cpmtool.engine.sampling import categorical, filter_logits
from cpmtool.errors import ConfigError, ModelError

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding settings (vLLM's `speculative_config` names in brackets).

    method: "ngram" (prompt lookup) or "draft" (a draft model) [method].
    num_tokens: proposals per step, k [num_speculative_tokens].
    draft_model: for "draft": a registry name, HF directory or `self:N` [model].
    frspec_vocab: restrict the draft's LM head to this many most frequent tokens (FR-Spec).
    frspec_file: the frequency list (`cpmtool models freq`); default: the target model's list in
        $CPMTOOL_HOME/freq/.
    prompt_lookup_max / prompt_lookup_min: n-gram sizes tried, longest first.
    """

    method: str = "ngram"
    num_tokens: int = 4
    draft_model: str | None = None
    frspec_vocab: int | None = None
    frspec_file: str | None = None
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown --spec method {self.method!r} (valid: {', '.join(METHODS)})")
        if not 1 <= self.num_tokens <= 32:
            problems.append(f"--spec-tokens must be in [1, 32] (got {self.num_tokens})")
        if self.method == "draft" and not self.draft_model:
            problems.append("--spec draft needs --draft-model (a model with the same tokenizer, or self:N)")
        if self.method == "ngram" and self.draft_model:
            problems.append("--draft-model only applies to --spec draft")
        if self.frspec_vocab is not None and self.method != "draft":
            problems.append("--frspec-vocab only applies to --spec draft")
        if self.frspec_vocab is not None and self.frspec_vocab < 1:
            problems.append(f"--frspec-vocab must be >= 1 (got {self.frspec_vocab})")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            problems.append("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if problems:
            raise ConfigError(problems)


def spec_config(spec: str | None, draft_model: str | None = None, spec_tokens: int = 4,
                frspec_vocab: int | None = None, frspec_file: str | None = None) -> SpecConfig | None:
    """The SpecConfig for the CLI flags `--spec ngram|draft --draft-model M --spec-tokens K
    --frspec-vocab N`, or None when `--spec` is not given (or "none")."""
    if spec is None or spec == "none":
        if draft_model or frspec_vocab:
            raise ConfigError("--draft-model / --frspec-vocab need --spec draft")
        return None
    return SpecConfig(method=spec, num_tokens=spec_tokens, draft_model=draft_model, frspec_vocab=frspec_vocab,
                      frspec_file=frspec_file)


@dataclass
class SpecStats:
    """Counters over all steps: `steps` row-steps, `drafted`/`accepted` draft tokens, `emitted` tokens."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": round(self.acceptance_rate, 4), "tokens_per_step": round(self.tokens_per_step, 4)}


# -- the acceptance rule -------------------------------------------------------------------------

def accept_tokens(p: torch.Tensor, draft: Sequence[int], q: torch.Tensor | None = None,
                  q_ids: torch.Tensor | None = None, draft_idx: Sequence[int] | None = None,
                  generator: torch.Generator | None = None) -> list[int]:
    """Tokens to emit for one row: the accepted prefix of `draft` plus one target token.

    Args:
        p: (l+1, V) target probabilities at the l draft positions and the one after them.
        draft: the l proposed tokens.
        q: (l, Vq) draft probabilities the proposals were sampled from, over `q_ids` (Vq,) when
            given (FR-Spec) or over the whole vocabulary; None for point-mass proposals (n-gram).
        draft_idx: the proposals' indices into `q_ids` (found by search when omitted).
        generator: the row's random stream.
    """
    draft = [int(x) for x in draft]
    n = len(draft)
    if n:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    for t, x in enumerate(draft):
        px = float(p[t, x])
        if q is None:
            qx = 1.0
        else:
            j = x if q_ids is None else (int(draft_idx[t]) if draft_idx is not None else _index_of(q_ids, x))
            qx = float(q[t, j]) if j >= 0 else 0.0
        if qx > 0 and float(u[t]) * qx <= px:
            continue
        residual = p[t].double().clone()
        if q is None:
            residual[x] = 0.0
        elif q_ids is None:
            residual -= q[t].double()
        else:
            residual.index_add_(0, q_ids, -q[t].double())
        residual.clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
            residual = p[t].double()
        return draft[:t] + [int(categorical(residual[None], [generator])[0])]
    return draft + [int(categorical(p[n][None], [generator])[0])]


def _index_of(ids: torch.Tensor, x: int) -> int:
    hit = (ids == x).nonzero()
    return int(hit[0, 0]) if len(hit) else -1


# -- drafters ------------------------------------------------------------------------------------

@dataclass
class Drafts:
    """Proposals for the running rows: `tokens[b]` (up to k each); for a draft model also the
    distributions they were sampled from, q (B, k, Vq) over `q_ids` (None: the full vocabulary),
    and their indices in q's vocabulary, `idx` (B, k)."""

    tokens: list[list[int]]
    q: torch.Tensor | None = None
    q_ids: torch.Tensor | None = None
    idx: torch.Tensor | None = None


def _history(s: _Seq) -> list[int]:
    return s.req.prompt_ids + s.tokens


def _room(s: _Seq, k: int) -> int:
    # proposals beyond max_tokens - 1 can never be emitted (one token always comes from the target)
    return max(0, min(k, s.req.params.max_tokens - len(s.tokens) - 1))


def prompt_lookup(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the history's last n-gram,
    longest n first (transformers' PromptLookupCandidateGenerator)."""
    import numpy as np

    arr = np.asarray(history, dtype=np.int64)
    size = len(arr)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        pattern = arr[size - n:]
        hit = np.ones(size - n, dtype=bool)  # windows starting at 0..size-n-1: each has a continuation
        for j in range(n):
            hit &= arr[j: size - n + j] == pattern[j]
        starts = np.flatnonzero(hit)
        if len(starts):
            start = int(starts[0]) + n
            return arr[start: start + k].tolist()
    return []


class NgramDrafter:
    def __init__(self, config: SpecConfig):
        self.config = config

    def propose(self, seqs: list[_Seq], k: int) -> Drafts:
        c = self.config
        out = []
        for s in seqs:
            room = _room(s, k)
            out.append(prompt_lookup(_history(s), room, c.prompt_lookup_max, c.prompt_lookup_min) if room else [])
        return Drafts(out)


class ModelDrafter:
    """Drafts with a small model; its KV cache follows the scheduler's rows (same order)."""

    def __init__(self, model, head_ids: torch.Tensor | None, head_w: torch.Tensor | None):
        self.model = model
        self.head_ids, self.head_w = head_ids, head_w
        self.rows: list[_Seq] = []
        self.cache = None

    def propose(self, seqs: list[_Seq], k: int) -> Drafts:
        rooms = [_room(s, k) for s in seqs]
        k = max(rooms)
        if k == 0:
            return Drafts([[] for _ in seqs])
        self._sync(seqs)
        dev = self.cache.valid.device
        hist = [_history(s) for s in seqs]
        n = torch.tensor([len(h) for h in hist], device=dev)  # (B,) history length
        self._ensure_room(int(n.max()) + k)
        # feed the last two tokens: the one before last may be missing (all proposals accepted last
        # step); when it is cached, writing it again at its own position is harmless
        ids = torch.tensor([h[-2:] for h in hist], device=dev)  # (B, 2)
        pos = torch.stack([n - 2, n - 1], 1)
        params = [s.req.params for s in seqs]
        temp = torch.tensor([p.temperature for p in params])
        greedy = temp <= 0
        rows = (~greedy).nonzero().flatten()
        top_k = torch.tensor([p.top_k for p in params])[rows]
        top_p = torch.tensor([p.top_p for p in params])[rows]
        min_p = torch.tensor([p.min_p for p in params])[rows]
        gens = [seqs[r].generator for r in rows.tolist()]
        toks, idxs, qs = [], [], []
        h = self.model.hidden_states(ids, pos, self.cache)[:, -1]  # (B, hidden)
        for j in range(k):
            # on the CPU, like the target's sampling: the rows' seeded generators are CPU generators
            logits = (h @ self.head_w.T if self.head_w is not None else self.model.lm_head(h)).float().cpu()  # (B, Vq)
            idx = logits.argmax(-1)
            q = None
            if len(rows):
                q = filter_logits(logits[rows], temp[rows], top_k, top_p, min_p).softmax(-1)  # (R, Vq)
                idx[rows] = categorical(q, gens)
            tok = self.head_ids[idx] if self.head_ids is not None else idx
            toks.append(tok)
            idxs.append(idx)
            qs.append(q)
            if j < k - 1:
                h = self.model.hidden_states(tok[:, None].to(dev), (n + j)[:, None], self.cache)[:, -1]
        tok_t = torch.stack(toks, 1).tolist()  # (B, k)
        drafts = Drafts([t[:r] for t, r in zip(tok_t, rooms, strict=True)], q_ids=self.head_ids,
                        idx=torch.stack(idxs, 1))
        if len(rows):
            vq = qs[0].shape[-1]
            q_all = torch.zeros(len(seqs), k, vq)
            q_all[rows] = torch.stack(qs, 1)
            drafts.q = q_all
        return drafts

    def _sync(self, seqs: list[_Seq]) -> None:
        """Make the draft cache hold exactly `seqs`' rows, in order; prefill rows it has not seen."""
        known = {id(s): i for i, s in enumerate(self.rows)}
        old = [known[id(s)] for s in seqs if id(s) in known]
        new = [s for s in seqs if id(s) not in known]
        if not old:
            self.cache = None
        elif old != list(range(len(self.rows))):
            self.cache.select_rows(torch.tensor(old, device=self.cache.valid.device))
        order = [s for s in seqs if id(s) in known]
        if new:
            fresh = self._prefill(new)
            self.cache = fresh if self.cache is None else self.cache.append_rows(fresh)
            order += new
        if [id(s) for s in order] != [id(s) for s in seqs]:
            at = {id(s): i for i, s in enumerate(order)}
            self.cache.select_rows(torch.tensor([at[id(s)] for s in seqs], device=self.cache.valid.device))
        self.rows = list(seqs)

    def _prefill(self, seqs: list[_Seq]):
        # each request's prompt once, then fanned out to its samples (like the target's admission)
        reqs = list({id(s.req): s.req for s in seqs}.values())
        lens = [len(r.prompt_ids) for r in reqs]
        t = max(lens)
        p = self.model.model.embed_tokens.weight
        ids = torch.tensor([r.prompt_ids + [0] * (t - len(r.prompt_ids)) for r in reqs], device=p.device)
        cache = self.model.new_cache(len(reqs), max(n + r.params.max_tokens for n, r in zip(lens, reqs, strict=True)))
        self.model.hidden_states(ids, torch.arange(t, device=p.device).expand(len(reqs), t), cache)
        for u, n in enumerate(lens):
            cache.valid[u, n:] = False
        at = {id(r): u for u, r in enumerate(reqs)}
        cache.select_rows(torch.tensor([at[id(s.req)] for s in seqs], device=p.device))
        return cache

    def _ensure_room(self, last_pos: int) -> None:
        if last_pos >= self.cache.max_len:
            self.cache.grow(max(last_pos + 1, self.cache.max_len + 256))




def layer_prefix(model, n_layers: int):
    """A `Transformer` made of the first `n_layers` blocks of `model` plus its final norm and LM
    head, sharing their weights (an early-exit draft)."""
    import dataclasses

    from cpmtool.model.transformer import Transformer

    total = model.config.num_hidden_layers
    if not 1 <= n_layers < total:
        raise ConfigError(f"draft self:{n_layers}: need 1 <= N < {total} (the target's layer count)")
    cfg = dataclasses.replace(model.config, num_hidden_layers=n_layers)
    with torch.device("meta"):
        view = Transformer(cfg)
    view.model.embed_tokens = model.model.embed_tokens
    view.model.layers = torch.nn.ModuleList(list(model.model.layers)[:n_layers])
    view.model.norm = model.model.norm
    view.lm_head = model.lm_head
    view.inv_freq = model.inv_freq
    return view.eval()


# -- wiring into the engine -----------------------------------------------------------------------

class Speculator:
    """A NativeEngine's speculative setup: the config, the loaded draft (if any) and the counters."""

    def __init__(self, engine, config: SpecConfig):
        self.config = config
        self.stats = SpecStats()
        self.draft = self.head_ids = self.head_w = None
        if config.method == "draft":
            self.draft = _load_draft(engine, config.draft_model)
            vocab = min(self.draft.config.vocab_size, engine.model.config.vocab_size)
            dev = engine.device
            if config.frspec_vocab is not None:
                from cpmtool.model.freq import freq_path, frspec_ids, load_freq

                path = config.frspec_file or freq_path(getattr(engine.tokenizer, "name_or_path", "") or "model")
                ids = frspec_ids(load_freq(path), config.frspec_vocab, engine.eos_ids, vocab_size=vocab)
                self.head_ids = torch.tensor(ids, device=dev)
            elif self.draft.config.vocab_size != vocab:
                self.head_ids = torch.arange(vocab, device=dev)
            if self.head_ids is not None:
                # FR-Spec: the draft's LM head is a row gather of the full one, made once
                self.head_w = self.draft.lm_head.weight.detach()[self.head_ids].contiguous()  # (Vq, hidden)

    def scheduler(self, engine, max_batch: int, max_len: int | None) -> SpecScheduler:
        return SpecScheduler(engine, max_batch, max_len, self)

    def new_drafter(self):
        if self.config.method == "ngram":
            return NgramDrafter(self.config)
        return ModelDrafter(self.draft, self.head_ids, self.head_w)


def _load_draft(engine, name: str):
    if name.startswith("self:"):
        try:
            n = int(name.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"--draft-model {name!r}: expected self:N with N a layer count") from e
        return layer_prefix(engine.model, n)
    from cpmtool.model.loader import load_model
    from cpmtool.model.tokenizer import load_tokenizer

    p = engine.model.model.embed_tokens.weight
    draft, _ = load_model(name, dtype=p.dtype, device=p.device)
    try:
        same = load_tokenizer(name).get_vocab() == engine.tokenizer.get_vocab()
    except ModelError:  # a bare checkpoint without tokenizer files: trust the vocabulary size
        same = draft.config.vocab_size == engine.model.config.vocab_size
    if not same:
        raise ConfigError(f"--draft-model {name}: its tokenizer differs from the target's (speculative decoding "
                          "needs the same vocabulary)")
    return draft.eval()


class SpecScheduler(Scheduler):
    """The native Scheduler with speculative decode steps (admission and prefill are unchanged)."""

    draw_ahead = False  # the acceptance tests draw from the rows' generators between tokens
    use_graphs = False  # a verification step's width varies with the drafts: it runs eagerly

    def __init__(self, engine, max_batch: int, max_len: int | None, spec: Speculator):
        super().__init__(engine, max_batch, max_len)
        self.spec = spec
        self.drafter = spec.new_drafter()

    def _decode(self) -> list[TokenEvent]:
        seqs = self.running
        k = self.spec.config.num_tokens
        drafts = self.drafter.propose(seqs, k)
        width = max(len(d) for d in drafts.tokens)
        if width == 0:
            self.spec.stats.steps += len(seqs)
            self.spec.stats.emitted += len(seqs)
            return super()._decode()
        dev = self.engine.device
        ids = torch.tensor([[s.tokens[-1]] + d + [0] * (width - len(d)) for s, d in zip(seqs, drafts.tokens,
                                                                                          strict=True)], device=dev)
        start = torch.tensor([s.pos for s in seqs], device=dev)  # (B,)
        pos = start[:, None] + torch.arange(width + 1, device=dev)  # (B, W+1)
        if int(pos.max()) >= self.cache.max_len:
            self.cache.grow(int(pos.max()) + 1 + k)
        logits = self.model(ids, pos, self.cache).float().cpu()  # (B, W+1, V); acceptance runs on the CPU
        params = [s.req.params for s in seqs]
        temp = torch.tensor([p.temperature for p in params])
        sampled = (temp > 0).nonzero().flatten().tolist()
        probs = {}
        if sampled:
            w1 = width + 1
            r = torch.tensor(sampled)
            rep = lambda x: x[r].repeat_interleave(w1)  # noqa: E731
            x = filter_logits(logits[r].reshape(-1, logits.shape[-1]), rep(temp),
                              rep(torch.tensor([p.top_k for p in params])), rep(torch.tensor([p.top_p for p in params])),
                              rep(torch.tensor([p.min_p for p in params])))
            probs = dict(zip(sampled, x.softmax(-1).view(len(sampled), w1, -1), strict=True))
        argmax = logits.argmax(-1).tolist()  # (B, W+1)
        n_acc = []
        events: list[TokenEvent] = []
        st = self.spec.stats
        for b, s in enumerate(seqs):
            d = drafts.tokens[b]
            if b in probs:
                q = drafts.q[b, : len(d)] if drafts.q is not None else None
                idx = drafts.idx[b, : len(d)].tolist() if drafts.idx is not None else None
                out = accept_tokens(probs[b][: len(d) + 1], d, q, drafts.q_ids, idx, s.generator)
            else:
                a = 0
                while a < len(d) and d[a] == argmax[b][a]:
                    a += 1
                out = d[:a] + [argmax[b][a]]
            n_acc.append(len(out) - 1)
            st.steps += 1
            st.drafted += len(d)
            st.accepted += len(out) - 1
            want_lp = s.req.params.logprobs is not None
            logp = logits[b, : len(out)].log_softmax(-1) if want_lp else None
            for j, tok in enumerate(out):
                s.tokens.append(tok)
                st.emitted += 1
                if want_lp:
                    s.logprobs.append(float(logp[j, tok]))
                    if s.req.params.logprobs:
                        v, i = logp[j].topk(s.req.params.logprobs)
                        s.top.append(dict(zip(i.tolist(), v.tolist(), strict=True)))
                self._check_stop(s, tok)
                events.append(TokenEvent(s.req.request, s.index, tok, s.finish_reason is not None, s))
                if s.finish_reason is not None:
                    break
        # slots after each row's accepted prefix hold rejected or padded proposals: hide them
        kept_end = start + torch.tensor(n_acc, device=dev)  # last valid slot per row
        slots = torch.arange(self.cache.max_len, device=dev)
        junk = (slots[None] > kept_end[:, None]) & (slots[None] <= (start + width)[:, None])
        self.cache.valid &= ~junk
        return events

