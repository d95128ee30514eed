"""train-sft: supervised fine-tuning on chat data, loss on the assistant replies only.

    records (messages | prompt + completion) -> chat template -> (ids, labels) -> [packing]
    -> shuffled batches -> cross-entropy on reply tokens -> AdamW -> metrics, checkpoints

Packing concatenates examples into rows of --max-len tokens. Positions restart at 0 for each
example and attention is block-diagonal (an example never sees its neighbours), so a packed batch
computes exactly the per-example losses without the padding. Where the model runs attention packed
(`Transformer.packs_attention`: fp32 on the CPU, kernels/varlen_attention) the examples of a batch
run as their own rows, back to back with no padding and no mask, the LM head on the labelled tokens
only: the same losses, as the tests check against the collated rows.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cpmtool.errors import InputError
from cpmtool.train import losses
from cpmtool.train.checkpoint import (
    latest_checkpoint,
    load_for_training,
    load_state,
    save_checkpoint,
    set_rng_states,
)
from cpmtool.train.config import SFTConfig, to_dict
from cpmtool.train.cpu_heap import keep_freed_memory
from cpmtool.train.distributed import close_distributed, init_distributed, wrap_ddp
from cpmtool.train.optim import adamw
from cpmtool.train.runlog import MetricsLog, plot_curves, read_metrics, write_run_json
from cpmtool.train.sequences import eos_id, sft_example


def packed_attention(q, k, v, *, positions, **_):
    """Causal attention within documents of a packed row: a document starts where the position is 0.

    q (B, H, T, D); k, v (B, Hkv, T, D); positions (B, T).
    """
    doc = (positions == 0).cumsum(-1)  # (B, T) document index of each token
    t = positions.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


@contextlib.contextmanager
def packed(model):
    """Swap every attention layer of `model` to `packed_attention` for the duration."""
    from cpmtool.model.transformer import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.attn_fn for m in layers]
    for m in layers:
        m.attn_fn = packed_attention
    try:
        yield model
    finally:
        for m, fn in zip(layers, saved, strict=True):
            m.attn_fn = fn


def pack_examples(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedy first-fit in order: rows of examples whose total length is at most max_len."""
    rows, cur, size = [], [], 0
    for ids, labels in examples:
        if cur and size + len(ids) > max_len:
            rows.append(cur)
            cur, size = [], 0
        cur.append((ids, labels))
        size += len(ids)
    if cur:
        rows.append(cur)
    return rows


def collate(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, device="cpu"):
    """(ids, labels, positions), each (B, T): every row is one or more examples back to back,
    positions restart per example; padding is labelled -100."""
    width = max(sum(len(i) for i, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for i, lab in row:
            n = len(i)
            ids[b, at:at + n] = torch.tensor(i)
            labels[b, at:at + n] = torch.tensor(lab)
            pos[b, at:at + n] = torch.arange(n)
            at += n
        last = len(row[-1][0])
        pos[b, at:] = torch.arange(last, last + width - at)  # padding extends the last example, after it
    return ids.to(device), labels.to(device), pos.to(device)


class SFTRecipe:
    """setup() -> train() -> cleanup(); save_checkpoint() every --save-every steps."""

    def __init__(self, cfg: SFTConfig, log=None):
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
        self.pad_id = config.pad_token_id or 0
        eos = eos_id(self.tokenizer, config)
        stats = RunStats()
        self.eos = eos
        self.examples, self.rejected = [], {}
        for rec in self.records(read_records(cfg.data, stats=stats)):
            try:
                self.examples.append(self.example(rec))
            except InputError as e:
                self.rejected[str(e)] = self.rejected.get(str(e), 0) + 1
        for reason, count in stats.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        if not self.examples:
            raise InputError(f"{cfg.data}: no usable SFT records (rejected: {self.rejected or 'none'})")
        if cfg.pack:
            order = list(range(len(self.examples)))
            random.Random(cfg.seed).shuffle(order)
            self.rows = pack_examples([self.examples[i] for i in order], cfg.max_len)
        else:
            self.rows = [[e] for e in self.examples]
        per_epoch = math.ceil(len(self.rows) / cfg.batch_size)
        self.total = cfg.steps or cfg.epochs * per_epoch
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
                           examples=len(self.examples), rows=len(self.rows), rejected=self.rejected,
                           steps_total=self.total,
                           resumed_from=str(ckpt) if ckpt else None)

    # hooks a recipe built on this one (quantize-ternary's QAT) overrides
    def records(self, records):
        """The training records of the data stream (QAT holds some out for evaluation)."""
        return records

    def example(self, record: dict) -> tuple[list[int], list[int]]:
        return sft_example(self.tokenizer, record, self.eos, self.cfg.max_len)

    # Examples run one per row, packed, through kernels/varlen_attention where the model takes it
    # (fp32 on the CPU): no padding and no block-diagonal mask over a packed row's T x T, and the LM
    # head on the labelled positions only. A subclass whose loss needs the (B, T, V) logits of the
    # collated rows (QAT's distillation) turns it off.
    per_example = True

    def batch_loss(self, rows) -> tuple[torch.Tensor, int, dict]:
        """(mean loss over the labelled tokens of `rows`, how many there are, extra metrics)."""
        if self.per_example and getattr(self.model, "packs_attention", lambda: False)():
            return self.example_loss([e for row in rows for e in row])
        ids, labels, pos = collate(rows, self.pad_id, self.cfg.device)
        loss, extra = self.loss(ids, labels, pos)
        return loss, int((labels != -100).sum()), extra

    def example_loss(self, examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, int, dict]:
        # each example its own row at positions 0.., as a packed row's block-diagonal attention sees it
        dev = self.cfg.device
        lens = [len(i) for i, _ in examples]
        width = max(lens)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for d, (i, lab) in enumerate(examples):
            ids[d, : len(i)] = torch.tensor(i)
            labels[d, : len(i)] = torch.tensor(lab)
        flat = labels.flatten()
        keep = (flat != -100).nonzero().flatten()  # (N,) the labelled positions
        select = torch.arange(width).expand(len(examples), width)
        logits = self.ddp(ids.to(dev), lengths=lens, select=select.to(dev), keep=keep.to(dev))  # (N, V)
        n = keep.numel()
        return F.cross_entropy(logits.float(), flat[keep].to(dev), reduction="sum") / max(n, 1), n, {}

    def loss(self, ids, labels, pos) -> tuple[torch.Tensor, dict]:
        """(mean loss over the labelled tokens of these rows, extra metrics for the step's row)."""
        logits = self.ddp(ids, pos)  # (B, T, V)
        loss, _ = losses.sft_loss(logits, labels)
        return loss, {}

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    def save_final(self) -> None:
        from cpmtool.model.loader import save_pretrained

        save_pretrained(self.model, self.out / "model", tokenizer=self.tokenizer)
        plot_curves(read_metrics(self.metrics.path), self.out / "curves.png", title="train-sft")

    def batch(self, step: int) -> list:
        """Rows of optimizer step `step` (1-based): a seeded permutation of the rows per epoch."""
        bs, n = self.cfg.batch_size, len(self.rows)
        per_epoch = math.ceil(n / bs)
        epoch, k = divmod(step - 1, per_epoch)
        order = list(range(n))
        random.Random(f"{self.cfg.seed}:epoch:{epoch}").shuffle(order)
        return [self.rows[i] for i in order[k * bs:(k + 1) * bs]], epoch

    def train(self) -> dict:
        cfg = self.cfg
        last = None
        for step in range(self.step + 1, self.total + 1):
            self.step = step
            t0 = time.perf_counter()
            rows, epoch = self.batch(step)
            n_tok = sum(sum(x != -100 for x in lab) for row in rows for _, lab in row)
            mine = self.dist.shard(rows)
            lr = self.lr_at(step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            loss_sum, extra = 0.0, {}
            ctx = packed(self.model) if cfg.pack else contextlib.nullcontext()
            with ctx:
                if mine:
                    loss, n_lab, extra = self.batch_loss(mine)
                    # mean over the labelled tokens of the whole batch, across ranks
                    loss = loss * n_lab / max(n_tok, 1)
                    (loss * self.dist.world).backward()
                    loss_sum = float(loss.detach())
                else:
                    (self.ddp(torch.full((1, 1), self.pad_id, device=cfg.device)).sum() * 0.0).backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
            self.opt.step()
            dt = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch, "loss": self.dist.sum([loss_sum])[0], "tokens": n_tok,
                   "grad_norm": float(gn), "lr": lr, "step_time": round(dt, 3),
                   "tokens_per_s": round(sum(len(i) for row in rows for i, _ in row) / max(dt, 1e-9), 1), **extra}
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
                self.save_final()
            self.log({"event": "checkpoint", "path": str(path)})
        self.dist.barrier()

    def cleanup(self) -> None:
        close_distributed(self.dist)


def train_sft(cfg: SFTConfig, log=None) -> dict:
    """Run the SFT recipe; returns {out, steps, last metrics row}.

    Raises:
        ConfigError, InputError, ModelError.
    """
    recipe = SFTRecipe(cfg, log)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "dist"):
            recipe.cleanup()
