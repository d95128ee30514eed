"""train-dpo: Direct Preference Optimisation against a frozen reference (the initial model).

    pairs (prompt | messages, chosen, rejected) -> chat template -> sequence log-probs of both
    replies under the policy and the frozen reference -> -log σ(β·margin) -> AdamW

The reference log-probs of a batch are computed once per step without gradients; the policy's
chosen and rejected replies go through one forward together.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from cpmtool.errors import InputError
from cpmtool.train import losses
from cpmtool.train.checkpoint import (
    latest_checkpoint,
    load_for_training,
    load_state,
    save_checkpoint,
    set_rng_states,
)
from cpmtool.train.config import DPOConfig, to_dict
from cpmtool.train.cpu_heap import keep_freed_memory
from cpmtool.train.distributed import close_distributed, init_distributed, wrap_ddp
from cpmtool.train.optim import adamw
from cpmtool.train.runlog import MetricsLog, plot_curves, read_metrics, write_run_json
from cpmtool.train.sequences import eos_id, preference_example, response_logprobs


def sequence_logps(model, pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int):
    """Summed reply log-probs (chosen (B,), rejected (B,)) of preference pairs, one forward."""
    prompts = [p for p, _, _ in pairs] * 2
    replies = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    logp, _, mask = response_logprobs(model, prompts, replies, with_entropy=False, pad_id=pad_id)
    seq = (logp * mask).sum(-1)  # (2B,)
    return seq[: len(pairs)], seq[len(pairs):]


class DPORecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() every --save-every steps."""

    def __init__(self, cfg: DPOConfig, log=None):
        self.cfg = cfg.validate().resolved()
        self.log = log or (lambda d: None)

    def setup(self) -> None:
        from cpmtool.io import RunStats, read_records
        from cpmtool.model.tokenizer import load_tokenizer

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
        self.tokenizer = load_tokenizer(cfg.model)
        ckpt = latest_checkpoint(self.out) if cfg.resume else None
        self.model, config = load_for_training(ckpt or cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.model.train()
        self.ref = load_for_training(cfg.model, dtype=cfg.dtype, device=cfg.device)[0].eval().requires_grad_(False)
        self.pad_id = config.pad_token_id or 0
        eos = eos_id(self.tokenizer, config)
        stats = RunStats()
        self.pairs, self.rejected = [], {}
        for rec in read_records(cfg.data, stats=stats):
            try:
                self.pairs.append(preference_example(self.tokenizer, rec, eos, cfg.max_len))
            except InputError as e:
                self.rejected[str(e)] = self.rejected.get(str(e), 0) + 1
        for reason, count in stats.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        if not self.pairs:
            raise InputError(f"{cfg.data}: no usable preference records (rejected: {self.rejected or 'none'})")
        self.total = cfg.steps or cfg.epochs * math.ceil(len(self.pairs) / cfg.batch_size)
        self.ddp = wrap_ddp(self.model, self.dist)
        self.opt = adamw(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        if ckpt is not None:
            st = load_state(ckpt)
            self.step = st["step"]
            self.opt.load_state_dict(st["optimizer"])
            set_rng_states(st["rng"])
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if ckpt else None,
                                  enabled=self.dist.main)
        if self.dist.main:
            write_run_json(self.out, to_dict(cfg), world_size=self.dist.world, malloc=self.malloc,
                           pairs=len(self.pairs), rejected=self.rejected, steps_total=self.total,
                           resumed_from=str(ckpt) if ckpt else None)

    def batch(self, step: int):
        bs, n = self.cfg.batch_size, len(self.pairs)
        per_epoch = math.ceil(n / bs)
        epoch, k = divmod(step - 1, per_epoch)
        order = list(range(n))
        random.Random(f"{self.cfg.seed}:epoch:{epoch}").shuffle(order)
        return [self.pairs[i] for i in order[k * bs:(k + 1) * bs]], epoch

    def train(self) -> dict:
        cfg = self.cfg
        last = None
        for step in range(self.step + 1, self.total + 1):
            self.step = step
            t0 = time.perf_counter()
            pairs, epoch = self.batch(step)
            mine = self.dist.shard(pairs)
            lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            sums = [0.0] * 5
            if mine:
                with torch.no_grad():
                    rc, rr = sequence_logps(self.ref, mine, self.pad_id)
                pc, pr = sequence_logps(self.ddp, mine, self.pad_id)
                loss, st = losses.dpo_loss(pc, pr, rc, rr, cfg.beta)
                # mean over the pairs of the whole batch, across ranks
                (loss * len(mine) / len(pairs) * self.dist.world).backward()
                sums = [v * len(mine) for v in (float(loss.detach()), st["reward_chosen"], st["reward_rejected"],
                                                st["reward_margin"], st["reward_accuracy"])]
            else:
                (self.ddp(torch.full((1, 1), self.pad_id, device=cfg.device)).sum() * 0.0).backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
            self.opt.step()
            tot = [v / len(pairs) for v in self.dist.sum(sums)]
            row = {"step": step, "epoch": epoch, "loss": tot[0], "reward_chosen": tot[1], "reward_rejected": tot[2],
                   "reward_margin": tot[3], "pair_accuracy": tot[4], "grad_norm": float(gn), "lr": lr,
                   "step_time": round(time.perf_counter() - t0, 3)}
            self.metrics.write(row)
            self.log(row)
            last = row
            if cfg.save_every and step % cfg.save_every == 0 and step < self.total:
                self.save_checkpoint()
        self.save_checkpoint(final=True)
        return {"out": str(self.out), "steps": self.total, "rank": self.dist.rank, "last": last}

    def save_checkpoint(self, final: bool = False) -> None:
        if self.dist.main:
            path = save_checkpoint(self.out, self.step, self.model, self.tokenizer,
                                   {"optimizer": self.opt.state_dict()}, keep=self.cfg.keep_checkpoints)
            if final:
                from cpmtool.model.loader import save_pretrained

                save_pretrained(self.model, self.out / "model", tokenizer=self.tokenizer)
                plot_curves(read_metrics(self.metrics.path), self.out / "curves.png", title="train-dpo")
            self.log({"event": "checkpoint", "path": str(path)})
        self.dist.barrier()

    def cleanup(self) -> None:
        close_distributed(self.dist)


def train_dpo(cfg: DPOConfig, log=None) -> dict:
    """Run the DPO recipe; returns {out, steps, last metrics row}.

    Raises:
        ConfigError, InputError, ModelError.
    """
    recipe = DPORecipe(cfg, log)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "dist"):
            recipe.cleanup()
