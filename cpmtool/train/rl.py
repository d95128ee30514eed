"""train-rl: on-policy RL of a causal LM as one readable loop.

    step:  draw prompts -> rollout (native engine on the training model itself, no reload)
           -> reward (verifier, or TTRL majority vote) -> filter groups (DAPO dynamic sampling,
           PRIME accuracy range, NFT mixed groups) -> advantages -> policy update (AdamW,
           --ppo-epochs passes over mini-batches) -> metrics.jsonl, curves.png, checkpoint

Algorithms (formulas in ../shared/reference/rl-algorithms.md; the pieces in `losses` and
`advantages`):
- grpo: group-normalised advantages (Dr.GRPO with --no-norm-std), PPO clip with clip-low/high and
  dual clip, loss aggregation modes, optional KL loss to the frozen initial policy, DAPO dynamic
  sampling and overlong shaping.
- prime: an implicit PRM (a copy of the initial policy with its own optimizer) gives token
  rewards β·log(π_φ/π_ref); it is trained online with cross-entropy on the outcome labels
  (rewards taken before its update, PRIME's "after" order); RLOO per reward source, returns,
  whitening; prompts kept when their accuracy is in [lower, upper].
- nft: the Negative-aware Fine-Tuning loss on groups with mixed outcomes.
- luffy: a prompt's off-policy `reference` trace joins its group of n-1 on-policy samples;
  Dr.GRPO advantages over the mixed group; policy shaping p/(p+γ) on its tokens, no clipping.
- ttrl: label-free; the majority answer over --vote-n samples is the pseudo-label, the first --n
  samples are trained on; the gold answer (when present) is only logged.
Any PPO-loss algorithm takes --entropy-control clip-cov|kl-cov. --chunk-tokens makes the rollout
chunk-wise: unfinished trajectories carry over to the next step and are importance-weighted by
the behaviour log-probs recorded when each chunk was sampled.

The recipe follows the setup / train / save_checkpoint / cleanup protocol; `train_rl(cfg)` runs it.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cpmtool.errors import ConfigError, InputError
from cpmtool.train import advantages as adv_fn
from cpmtool.train import losses
from cpmtool.train.checkpoint import (
    latest_checkpoint,
    load_for_training,
    load_state,
    save_checkpoint,
    set_rng_states,
)
from cpmtool.train.config import RLConfig, to_dict
from cpmtool.train.cpu_heap import keep_freed_memory
from cpmtool.train.distributed import close_distributed, init_distributed, wrap_ddp
from cpmtool.train.optim import adamw
from cpmtool.train.runlog import MetricsLog, plot_curves, write_run_json
from cpmtool.train.sequences import encode_query, eos_id, padded, prompt_query, response_logprobs


@dataclass
class Sample:
    """One response (trajectory) of a group."""

    group: str  # uid of the prompt draw
    draw: int  # global index of the prompt draw (seeds derive from it)
    index: int  # sample index within the group
    record: dict
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    behav_logp: list[float] = field(default_factory=list)  # per token, when recorded
    versions: list[int] = field(default_factory=list)  # policy step that sampled each token
    finish: str | None = None  # "stop" | "length" | None while unfinished (chunk-wise rollout)
    text: str = ""
    off_policy: bool = False
    correct: bool | None = None  # against the gold answer
    reward: float = 0.0  # the training reward (shaped; TTRL: the vote's)


def derive_seed(*parts) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


class RLRecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() every --save-every steps."""

    def __init__(self, cfg: RLConfig, log=None):
        self.cfg = cfg.validate().resolved()
        self.log = log or (lambda d: None)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from cpmtool.engine.native import NativeEngine
        from cpmtool.model.tokenizer import load_tokenizer
        from cpmtool.rewards import load_reward

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # activations reused step after step instead of page-faulted in afresh (cpu_heap)
        self.malloc = keep_freed_memory(cfg.device)
        self.dist = init_distributed(cfg.device)
        self.out = Path(cfg.out)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.reward_fn = load_reward(cfg.reward)
        self.tokenizer = load_tokenizer(cfg.model)
        self.records, self.rejected = self._load_prompts(cfg.prompts, need_answer=cfg.algo != "ttrl")
        self.eval_records = self._load_prompts(cfg.eval_prompts, need_answer=True)[0] if cfg.eval_prompts else []
        if cfg.eval_n:
            self.eval_records = self.eval_records[: cfg.eval_n]
        self.offpolicy = self._load_offpolicy(cfg.offpolicy) if cfg.algo == "luffy" else {}

        ckpt = latest_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and ckpt is None:
            self.log({"event": "resume", "note": f"no checkpoint in {self.out}/checkpoints; starting afresh"})
        self.policy, self.model_config = load_for_training(ckpt or cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.policy.train()
        self.pad_id = self.model_config.pad_token_id or 0
        self.eos = eos_id(self.tokenizer, self.model_config)
        need_ref = cfg.kl_coef > 0 or cfg.algo == "prime"
        self.ref = None
        if need_ref:  # the frozen initial policy, whatever checkpoint the run resumes from
            self.ref = load_for_training(cfg.model, dtype=cfg.dtype, device=cfg.device)[0].eval().requires_grad_(False)
        self.engine = NativeEngine(self.policy, self.tokenizer, max_batch=cfg.max_batch)
        self.policy.train()
        self.ddp = wrap_ddp(self.policy, self.dist)
        self.opt = adamw(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.prm = self.prm_ddp = self.prm_opt = None
        if cfg.algo == "prime":
            self.prm = copy.deepcopy(self.ref).requires_grad_(True).train()
            self.prm_ddp = wrap_ddp(self.prm, self.dist)
            self.prm_opt = adamw(self.prm.parameters(), lr=cfg.prime_lr, weight_decay=0.0)
        self.step = 0
        self.cursor = 0  # prompt draws so far
        self.inflight: list[list[Sample]] = []  # chunk-wise rollout: groups still being generated
        if ckpt is not None:
            st = load_state(ckpt)
            self.step, self.cursor = st["step"], st["cursor"]
            self.opt.load_state_dict(st["optimizer"])
            self.inflight = st.get("inflight", [])
            if self.prm is not None:
                self.prm.load_state_dict(st["prm"])
                self.prm_opt.load_state_dict(st["prm_optimizer"])
            set_rng_states(st["rng"])
            self.log({"event": "resume", "checkpoint": str(ckpt), "step": self.step})
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if ckpt else None,
                                  enabled=self.dist.main)
        if self.dist.main:
            write_run_json(self.out, to_dict(cfg), world_size=self.dist.world, malloc=self.malloc,
                           prompts_loaded=len(self.records), prompts_rejected=self.rejected,
                           resumed_from=str(ckpt) if ckpt else None,
                           params=self.policy.num_parameters())

    def _load_prompts(self, path: str, need_answer: bool) -> tuple[list[dict], dict]:
        from cpmtool.io import RunStats, ensure_id, read_records

        stats = RunStats()
        keep, rejected = [], {}
        for rec in read_records(path, stats=stats):
            try:
                prompt_query(rec)
            except InputError as e:
                rejected[str(e)] = rejected.get(str(e), 0) + 1
                continue
            if need_answer and rec.get("answer") is None:
                rejected["no_answer"] = rejected.get("no_answer", 0) + 1
                continue
            keep.append(ensure_id(rec))
        for reason, count in stats.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + count
        if not keep:
            raise InputError(f"{path}: no usable prompt records (rejected: {rejected or 'none'})")
        return keep, rejected

    def _load_offpolicy(self, path: str) -> dict[str, str]:
        if not path:
            return {}
        from cpmtool.io import RunStats, read_records

        refs = {}
        for rec in read_records(path, stats=RunStats()):
            text = rec.get("reference") or rec.get("completion") or rec.get("solution")
            if rec.get("id") is not None and isinstance(text, str):
                refs[str(rec["id"])] = text
        return refs

    # ------------------------------------------------------------------ prompts and rollout
    def draw(self, count: int) -> list[tuple[int, dict]]:
        """The next `count` prompt draws: a fresh seeded permutation of the prompts each epoch."""
        import random

        n = len(self.records)
        out = []
        for _ in range(count):
            epoch, pos = divmod(self.cursor, n)
            if pos == 0 or not hasattr(self, "_perm") or self._perm[0] != epoch:
                order = list(range(n))
                random.Random(derive_seed(self.cfg.seed, "epoch", epoch)).shuffle(order)
                self._perm = (epoch, order)
            out.append((self.cursor, self.records[self._perm[1][pos]]))
            self.cursor += 1
        return out

    def generate(self, jobs: list[tuple[list[int], int, int, int]], *, temperature: float, logprobs: bool
                 ) -> list[list]:
        """Run (prompt_ids, n, max_tokens, seed) jobs on the engine, split over ranks; completions
        per job, in job order, on every rank."""
        from cpmtool.engine.types import Request, SamplingParams

        cfg = self.cfg
        mine = self.dist.shard(list(range(len(jobs))))
        reqs = [Request(prompt_ids=jobs[i][0], id=str(i), params=SamplingParams(
            n=jobs[i][1], temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0,
            max_tokens=jobs[i][2], seed=jobs[i][3], logprobs=0 if logprobs else None)) for i in mine]
        done = []
        if reqs:
            for i, res in zip(mine, self.engine.generate(reqs), strict=True):
                done.append((i, [(c.token_ids, c.finish_reason, c.logprobs, c.text) for c in res.completions]))
        self.policy.train()  # the engine puts the shared module in eval mode
        got = dict(item for part in self.dist.gather(done) for item in part)
        return [got[i] for i in range(len(jobs))]

    def rollout(self, draws: list[tuple[int, dict]]) -> list[list[Sample]]:
        """Groups of finished samples for prompt draws (whole responses in one go)."""
        cfg = self.cfg
        jobs, groups = [], []
        for k, rec in draws:
            ids = encode_query(self.tokenizer, prompt_query(rec, chat=cfg.chat))
            ref = self._reference(rec) if cfg.algo == "luffy" else None
            n_gen = cfg.vote_n if cfg.algo == "ttrl" else cfg.n - (ref is not None)
            jobs.append((ids, n_gen, cfg.max_tokens, derive_seed(cfg.seed, "draw", k)))
            group = []
            if ref is not None:  # LUFFY: the off-policy trace is sample 0 of its group
                toks = self.tokenizer.encode(ref, add_special_tokens=False)[: cfg.max_tokens - 1] + [self.eos]
                group.append(Sample(f"g{k}", k, 0, rec, ids, toks, finish="stop", text=ref, off_policy=True))
            groups.append(group)
        outs = self.generate(jobs, temperature=cfg.temperature, logprobs=False)
        for (k, rec), (ids, *_), group, comps in zip(draws, jobs, groups, outs, strict=True):
            for tokens, finish, _, text in comps:
                group.append(Sample(f"g{k}", k, len(group), rec, ids, list(tokens), finish=finish, text=text,
                                    versions=[self.step] * len(tokens)))
        return groups

    def _reference(self, rec: dict) -> str | None:
        ref = self.offpolicy.get(str(rec.get("id"))) or rec.get("reference")
        return ref if isinstance(ref, str) and ref else None

    def rollout_chunk(self) -> list[list[Sample]]:
        """Chunk-wise rollout (MiniCPM4 / CoPRIS design, rl-algorithms.md §7): top the in-flight
        groups up to --batch-size with new prompts, extend every unfinished trajectory by at most
        --chunk-tokens, return the groups whose samples have all finished."""
        cfg = self.cfg
        for k, rec in self.draw(max(cfg.batch_size - len(self.inflight), 0)):
            ids = encode_query(self.tokenizer, prompt_query(rec, chat=cfg.chat))
            self.inflight.append([Sample(f"g{k}", k, j, rec, ids) for j in range(cfg.n)])
        jobs, where = [], []
        for gi, group in enumerate(self.inflight):
            if all(not s.tokens and s.finish is None for s in group):  # a new group: one prefill, n samples
                jobs.append((group[0].prompt_ids, cfg.n, min(cfg.chunk_tokens, cfg.max_tokens),
                             derive_seed(cfg.seed, "draw", group[0].draw, "chunk", 0)))
                where.append((gi, None))
                continue
            for s in group:
                if s.finish is None:
                    chunk_no = len(s.tokens) // cfg.chunk_tokens
                    jobs.append((s.prompt_ids + s.tokens, 1, min(cfg.chunk_tokens, cfg.max_tokens - len(s.tokens)),
                                 derive_seed(cfg.seed, "draw", s.draw, s.index, "chunk", chunk_no)))
                    where.append((gi, s.index))
        outs = self.generate(jobs, temperature=cfg.temperature, logprobs=True)
        for (gi, j), comps in zip(where, outs, strict=True):
            targets = self.inflight[gi] if j is None else [self.inflight[gi][j]]
            for s, (tokens, finish, lps, _) in zip(targets, comps, strict=True):
                s.tokens += list(tokens)
                s.behav_logp += list(lps)
                s.versions += [self.step] * len(tokens)
                if finish == "stop":
                    s.finish = "stop"
                elif len(s.tokens) >= cfg.max_tokens:
                    s.finish = "length"
        done = [g for g in self.inflight if all(s.finish for s in g)]
        self.inflight = [g for g in self.inflight if not all(s.finish for s in g)]
        for g in done:
            for s in g:
                s.text = self.tokenizer.decode([t for t in s.tokens if t != self.eos], skip_special_tokens=True)
        return done

    # ------------------------------------------------------------------ rewards and filters
    def score(self, groups: list[list[Sample]]) -> dict:
        """Correctness and training rewards, in place; returns TTRL's vote statistics."""
        cfg = self.cfg
        stats = {"label_hits": 0, "labelled": 0, "reward_hits": 0, "ratio": 0.0}
        for group in groups:
            for s in group:
                _, s.correct = self.reward_fn(s.record, s.text) if s.record.get("answer") is not None else (None, None)
            if cfg.algo == "ttrl":
                from cpmtool.rewards.math import extract_answer
                from cpmtool.rewards.vote import majority, vote_rewards

                answers = [extract_answer(s.text) for s in group]
                vote = majority(answers)
                for s, r in zip(group, vote_rewards(answers, vote), strict=True):
                    s.reward = r
                stats["ratio"] += vote.ratio
                if group[0].record.get("answer") is not None:
                    stats["labelled"] += 1
                    if vote.answer is not None:
                        stats["label_hits"] += bool(self.reward_fn(group[0].record, f"\\boxed{{{vote.answer}}}")[1])
                    stats["reward_hits"] += sum((s.reward > 0) == bool(s.correct) for s in group[: cfg.n])
                del group[cfg.n:]  # vote over vote_n, train on the first n
            else:
                for s in group:
                    s.reward = float(bool(s.correct))
            if cfg.length_penalty != "none":
                shaped = adv_fn.length_reward(torch.tensor([float(s.reward) for s in group]),
                                              torch.tensor([len(s.tokens) for s in group]), [0] * len(group),
                                              scheme=cfg.length_penalty, alpha=cfg.length_alpha)
                for s, r in zip(group, shaped.tolist(), strict=True):
                    s.reward = r
            if cfg.overlong_buffer:
                pen = adv_fn.overlong_penalty(torch.tensor([len(s.tokens) for s in group]), cfg.max_tokens,
                                              cfg.overlong_buffer, cfg.overlong_penalty)
                for s, p in zip(group, pen.tolist(), strict=True):
                    s.reward += p
        return stats

    def keep_group(self, group: list[Sample]) -> bool:
        cfg = self.cfg
        ok = torch.tensor([float(bool(s.correct)) if cfg.algo != "ttrl" else s.reward for s in group])
        if cfg.algo == "prime":
            return bool(adv_fn.accuracy_range_filter(ok, [0] * len(group), cfg.prime_acc_lower,
                                                     cfg.prime_acc_upper).all())
        if cfg.algo == "nft":
            return bool(adv_fn.keep_varied_groups(ok, [0] * len(group), keep_singletons=False).all())
        if cfg.dynamic_sampling:
            return bool(adv_fn.keep_varied_groups(ok, [0] * len(group)).all())
        return True

    def collect(self) -> tuple[list[list[Sample]], dict]:
        """A training batch of groups, regenerating while filters leave it short (capped)."""
        cfg = self.cfg
        kept, seen, rounds, vote = [], [], 0, {"label_hits": 0, "labelled": 0, "reward_hits": 0, "ratio": 0.0}
        filtering = cfg.algo in ("prime", "nft") or cfg.dynamic_sampling
        while True:
            if cfg.chunk_tokens:
                groups = self.rollout_chunk()
            else:
                groups = self.rollout(self.draw(cfg.batch_size))
            rounds += 1
            st = self.score(groups)
            for k_ in vote:
                vote[k_] += st[k_]
            seen += groups
            kept += [g for g in groups if self.keep_group(g)]
            if cfg.chunk_tokens or not filtering or len(kept) >= cfg.batch_size:
                break
            if cfg.max_gen_batches and rounds >= cfg.max_gen_batches:
                break
        kept = kept[: cfg.batch_size]
        flat = [s for g in seen for s in g if not s.off_policy]
        info = {
            "reward": _mean([s.reward for g in seen for s in g]),
            "accuracy": _mean([float(bool(s.correct)) for s in flat if s.correct is not None]),
            "response_length": _mean([len(s.tokens) for s in flat]),
            "truncated_frac": _mean([float(s.finish == "length") for s in flat]),
            "gen_rounds": rounds, "groups_seen": len(seen), "groups_kept": len(kept),
            "gen_tokens": sum(len(s.tokens) for s in flat),
        }
        if cfg.algo == "ttrl":
            info["label_accuracy"] = vote["label_hits"] / max(vote["labelled"], 1)
            info["reward_accuracy"] = vote["reward_hits"] / max(vote["labelled"] * cfg.n, 1)
            info["majority_ratio"] = vote["ratio"] / max(len(seen), 1)
        if cfg.chunk_tokens:
            info["inflight_groups"] = len(self.inflight)
            toks = [self.step - v for g in kept for s in g for v in s.versions]
            info["staleness"] = _mean(toks) if toks else 0.0
        return kept, info

    # ------------------------------------------------------------------ advantages
    def advantages(self, samples: list[Sample], mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, L) per-token advantages of the batch; PRIME also updates its PRM here."""
        cfg = self.cfg
        index = [s.group for s in samples]
        scores = torch.tensor([s.reward for s in samples])
        if cfg.algo == "prime":
            return self.prime_step(samples, mask, index)
        if cfg.algo == "nft":  # the loss uses correctness and the correct rate instead
            return torch.zeros_like(mask), {}
        a = adv_fn.grpo_advantages(scores, index, norm_std=cfg.norm_std)
        return a[:, None] * mask, {}

    def prime_step(self, samples, mask, index) -> tuple[torch.Tensor, dict]:
        """PRIME: process rewards from the PRM before its update, then one PRM update on outcome labels."""
        cfg = self.cfg
        acc = torch.tensor([float(bool(s.correct)) for s in samples])
        rows = self.dist.shard(list(range(len(samples))))
        q_parts = []
        self.prm_opt.zero_grad(set_to_none=True)
        total = len(samples)
        stats = {"prm_loss": 0.0, "prm_acc": 0.0}
        for micro in self._micro(rows):
            sub = [samples[i] for i in micro]
            lp_phi, _, m = response_logprobs(self.prm_ddp, [s.prompt_ids for s in sub], [s.tokens for s in sub],
                                             temperature=cfg.temperature, with_entropy=False, pad_id=self.pad_id)
            with torch.no_grad():
                lp_ref, _, _ = response_logprobs(self.ref, [s.prompt_ids for s in sub], [s.tokens for s in sub],
                                                 temperature=cfg.temperature, with_entropy=False, pad_id=self.pad_id)
            loss, st = losses.prm_loss(lp_phi, lp_ref, m, acc[micro].to(m.device), cfg.prime_beta)
            # mean over the whole batch, across micro-batches and ranks
            (loss * len(micro) / total * self.dist.world).backward()
            q_parts.append((micro, (lp_phi - lp_ref).detach().cpu()))  # batch-level tensors live on the CPU
            stats["prm_loss"] += st["prm_loss"] * len(micro)
            stats["prm_acc"] += st["prm_acc"] * len(micro)
        if not rows:
            self._dummy_backward(self.prm_ddp)
        if cfg.prime_grad_clip:
            torch.nn.utils.clip_grad_norm_(self.prm.parameters(), cfg.prime_grad_clip)
        self.prm_opt.step()
        width = mask.shape[1]
        q = torch.zeros_like(mask)
        for part in self.dist.gather(q_parts):
            for micro, qm in part:
                q[micro, : qm.shape[1]] = qm[:, :width]
        summed = self.dist.sum([stats["prm_loss"], stats["prm_acc"]])
        proc = adv_fn.prime_process_rewards(q, mask, cfg.prime_beta)
        a = adv_fn.prime_advantages(proc, acc, mask, index, coef_rm=cfg.prime_coef_rm, coef_gt=cfg.prime_coef_gt)
        return a, {"prm_loss": summed[0] / total, "prm_acc": summed[1] / total,
                   "process_reward": float((proc * mask).sum() / mask.sum().clamp(min=1))}

    # ------------------------------------------------------------------ policy update
    def _micro(self, rows: list[int]) -> list[list[int]]:
        size = self.cfg.micro_batch_size or len(rows) or 1
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def _dummy_backward(self, ddp_module) -> None:
        # a rank without rows must still join DDP's gradient all-reduce
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.cfg.device)
        (ddp_module(ids).sum() * 0.0).backward()

    def _logp(self, module, samples, with_entropy=True):
        return response_logprobs(module, [s.prompt_ids for s in samples], [s.tokens for s in samples],
                                 temperature=self.cfg.temperature, with_entropy=with_entropy,
                                 entropy_grad=bool(self.cfg.entropy_coeff), pad_id=self.pad_id)

    def update(self, groups: list[list[Sample]]) -> dict:
        cfg = self.cfg
        samples = [s for g in groups for s in g]
        width = max(len(s.tokens) for s in samples)
        mask = padded([[1.0] * len(s.tokens) for s in samples], width)  # (B, L)
        off_mask = torch.tensor([[s.off_policy] * width for s in samples])
        adv, extra = self.advantages(samples, mask)
        correct = torch.tensor([float(bool(s.correct)) for s in samples])
        rate = adv_fn.group_mean(correct, [s.group for s in samples])

        n_mb = math.ceil(len(groups) / (cfg.mini_batch_size or len(groups)))
        shortcut = n_mb == 1 and cfg.ppo_epochs == 1 and not cfg.chunk_tokens
        old = None
        if cfg.chunk_tokens:  # behaviour log-probs of the policy version that sampled each chunk
            old = padded([s.behav_logp for s in samples], width)
        elif not shortcut:
            old = torch.zeros_like(mask)
            with torch.no_grad():
                for micro in self._micro(list(range(len(samples)))):
                    lp, _, _ = self._logp(self.policy, [samples[i] for i in micro], with_entropy=False)
                    old[micro, : lp.shape[1]] = lp.cpu()
        ref = None
        if cfg.kl_coef > 0:
            ref = torch.zeros_like(mask)
            with torch.no_grad():
                for micro in self._micro(list(range(len(samples)))):
                    lp, _, _ = self._logp(self.ref, [samples[i] for i in micro], with_entropy=False)
                    ref[micro, : lp.shape[1]] = lp.cpu()

        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "update", self.step))
        acc = _Acc()
        grad_norms = []
        loss_sum = 0.0
        lr = cfg.lr * min(1.0, (self.step) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        mb_size = cfg.mini_batch_size or len(groups)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(groups), generator=gen).tolist() if n_mb > 1 else list(range(len(groups)))
            for lo in range(0, len(groups), mb_size):
                mb_groups = order[lo:lo + mb_size]
                rows = [i for gi in mb_groups for i in self._group_rows(groups, gi)]
                n_tok = float(mask[rows].sum())
                n_seq = float((mask[rows].sum(-1) > 0).sum())
                mine = self.dist.shard(rows)
                self.opt.zero_grad(set_to_none=True)
                for micro in self._micro(mine):
                    sub = [samples[i] for i in micro]
                    logp, ent, m = self._logp(self.ddp, sub)
                    w, dev = m.shape[1], m.device
                    # the batch-level tensors stay on the CPU; a micro-batch's slices go to the model
                    o = logp.detach() if shortcut else old[micro, :w].to(dev)
                    loss, st = self.policy_loss(logp, o, adv[micro, :w].to(dev), m, off_mask[micro, :w].to(dev),
                                                correct[micro].to(dev), rate[micro].to(dev), n_tok, n_seq, gen)
                    if ref is not None:
                        kl = losses.kl_penalty(logp, ref[micro, :w].to(dev), cfg.kl_type)
                        loss = loss + cfg.kl_coef * losses.agg_loss(kl, m, cfg.loss_agg, num_tokens=n_tok,
                                                                     num_seqs=n_seq)
                        st["kl"] = float(losses.masked_mean(kl.detach(), m))
                    if cfg.entropy_coeff:
                        loss = loss - cfg.entropy_coeff * losses.agg_loss(ent, m, cfg.loss_agg, num_tokens=n_tok,
                                                                          num_seqs=n_seq)
                    (loss * self.dist.world).backward()
                    loss_sum += float(loss.detach())  # micro-batch losses add up to the mini-batch loss
                    st["entropy"] = float(losses.masked_mean(ent.detach(), m))
                    acc.add(st, float(m.sum()), first=(epoch == 0 and lo == 0))
                if not mine:
                    self._dummy_backward(self.ddp)
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip or float("inf"))
                grad_norms.append(float(gn))
                self.opt.step()
        out = acc.result(self.dist)
        out["loss"] = self.dist.sum([loss_sum])[0] / max(len(grad_norms), 1)
        out.update(extra)
        out["grad_norm"] = _mean(grad_norms)
        out["lr"] = lr
        out["optimizer_steps"] = len(grad_norms)
        return out

    @staticmethod
    def _group_rows(groups, gi) -> list[int]:
        start = sum(len(g) for g in groups[:gi])
        return list(range(start, start + len(groups[gi])))

    def policy_loss(self, logp, old, adv, mask, off, correct, rate, n_tok, n_seq, gen):
        cfg = self.cfg
        agg = {"agg": cfg.loss_agg, "num_tokens": n_tok, "num_seqs": n_seq}
        if cfg.algo == "nft":
            return losses.nft_loss(logp, old, correct, rate, mask, neg_weight=cfg.nft_neg_weight,
                                   normalize=cfg.nft_normalize)
        if cfg.algo == "luffy":
            return losses.luffy_loss(logp, old, adv, mask, off, gamma=cfg.luffy_gamma, norm=cfg.max_tokens)
        if cfg.entropy_control == "clip-cov":
            return losses.clip_cov_loss(logp, old, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                        clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                                        clip_cov_ub=cfg.clip_cov_ub, generator=gen, **agg)
        if cfg.entropy_control == "kl-cov":
            return losses.kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=cfg.kl_cov_ratio,
                                      ppo_kl_coef=cfg.ppo_kl_coef, **agg)
        loss, st = losses.ppo_clip_loss(logp, old, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                        clip_c=cfg.clip_c or None, **agg)
        st.update(losses._cov_stats(losses.token_covariance(logp, adv, mask), mask))
        return loss, st

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        if not self.eval_records:
            return None
        cfg = self.cfg
        jobs = [(encode_query(self.tokenizer, prompt_query(r, chat=cfg.chat)), 1, cfg.eval_max_tokens or cfg.max_tokens, 0)
                for r in self.eval_records]
        outs = self.generate(jobs, temperature=0.0, logprobs=False)
        hits = [bool(self.reward_fn(r, comps[0][3])[1]) for r, comps in zip(self.eval_records, outs, strict=True)]
        return sum(hits) / len(hits)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        import os

        cfg = self.cfg
        first = self.step + 1
        t_start = time.perf_counter()
        eval_s = 0.0
        if first == 1 and self.eval_records:
            row = {"step": 0, "eval_accuracy": self.evaluate()}
            eval_s = time.perf_counter() - t_start
            row["eval_s"] = round(eval_s, 3)
            self.metrics.write(row)
            self.log(row)
        last = None
        for step in range(first, cfg.steps + 1):
            self.step = step
            t0 = time.perf_counter()
            groups, info = self.collect()
            t1 = time.perf_counter()
            upd = self.update(groups) if groups else {"note": "no group kept; update skipped"}
            t2 = time.perf_counter()
            n_train_tok = sum(len(s.tokens) + len(s.prompt_ids) for g in groups for s in g)
            row = {"step": step, **info, **upd,
                   "rollout_s": round(t1 - t0, 3), "update_s": round(t2 - t1, 3), "step_time": round(t2 - t0, 3),
                   "gen_tokens_per_s": round(info["gen_tokens"] / max(t1 - t0, 1e-9), 1),
                   "train_tokens_per_s": round(n_train_tok / max(t2 - t1, 1e-9), 1),
                   "samples_per_s": round(sum(len(g) for g in groups) / max(t2 - t0, 1e-9), 2),
                   "elapsed_s": round(t2 - t_start, 1), "load_1m": round(os.getloadavg()[0], 2)}
            # --max-minutes: stop when another step, the final evaluation and the final save would not
            # fit (a step's time stands in for the save)
            over = bool(cfg.max_minutes) and (t2 - t_start) + 2 * (t2 - t0) + eval_s > cfg.max_minutes * 60
            final = step == cfg.steps or self.dist.gather(over)[0]
            if self.eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
                row["eval_accuracy"] = self.evaluate()
            self.metrics.write(row)
            self.log(row)
            last = row
            if final:
                break
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint()
        self.save_checkpoint(final=True)
        return {"out": str(self.out), "steps": self.step, "rank": self.dist.rank,
                "wall_s": round(time.perf_counter() - t_start, 1), "last": last}

    def save_checkpoint(self, final: bool = False) -> None:
        cfg = self.cfg
        if self.dist.main:
            from cpmtool.train.runlog import read_metrics

            if final or time.time() - getattr(self, "_plotted", 0.0) > 60:  # plotting is slow on a busy CPU
                plot_curves(read_metrics(self.metrics.path), self.out / "curves.png", title=f"train-rl {cfg.algo}")
                self._plotted = time.time()
            state = {"cursor": self.cursor, "optimizer": self.opt.state_dict(), "inflight": self.inflight}
            if self.prm is not None:
                state["prm"] = self.prm.state_dict()
                state["prm_optimizer"] = self.prm_opt.state_dict()
            path = save_checkpoint(self.out, self.step, self.policy, self.tokenizer, state, keep=cfg.keep_checkpoints)
            if final:
                from cpmtool.model.loader import save_pretrained

                save_pretrained(self.policy, self.out / "model", tokenizer=self.tokenizer)
            self.log({"event": "checkpoint", "path": str(path)})
        self.dist.barrier()

    def cleanup(self) -> None:
        close_distributed(self.dist)


class _Acc:
    """Token-weighted means of per-micro-batch statistics, summed across ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, stats: dict, tokens: float, first: bool) -> None:
        for k, v in stats.items():
            if not isinstance(v, (int, float)):
                continue
            if k == "entropy" and not first:
                continue  # entropy of the policy that sampled: the first mini-batch of the first epoch only
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * tokens
            self.weights[k] = self.weights.get(k, 0.0) + tokens

    def result(self, dist) -> dict:
        keys = sorted({k for part in dist.gather(sorted(self.sums)) for k in part})
        vals = dist.sum([self.sums.get(k, 0.0) for k in keys] + [self.weights.get(k, 0.0) for k in keys])
        n = len(keys)
        return {k: vals[i] / vals[n + i] for i, k in enumerate(keys) if vals[n + i] > 0}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def train_rl(cfg: RLConfig, log=None) -> dict:
    """Run the RL recipe; returns {out, steps, last metrics row}. `log(dict)` gets progress rows.

    Raises:
        ConfigError: conflicting or invalid settings (all reported together).
        InputError: unreadable prompts.
        ModelError: the model cannot be loaded.
    """
    recipe = RLRecipe(cfg, log)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "dist"):
            recipe.cleanup()


__all__ = ["RLRecipe", "Sample", "train_rl", "ConfigError"]
