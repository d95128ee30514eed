"""quantize-ternary: BitCPM-style ternary QAT from a full-precision checkpoint, then 2-bit packing.

    full-precision model -> evaluate (FP) -> swap block linears for TernaryLinear -> evaluate (naive
    post-training ternarisation) -> fine-tune the latent weights through the STE (train-sft's recipe,
    optional KL distillation from the frozen FP model) -> pack -> reload the packed file -> evaluate (QAT)
    -> card (README.md, card.json)

The training loop is `cpmtool.train.sft.SFTRecipe` with three hooks overridden: the examples
(task records with a `solution`, plain `text` documents), the loss (CE + KL) and the final save
(the packed model). Checkpoints hold the latent float weights, so `--resume` works as in train-sft.
Departures from BitCPM: its token budget and exact schedule are unpublished; here the schedule
is warmup, flat, then decay to 1/10 over the last 30% of steps (cpm-tiny's WSD).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cpmtool.errors import ConfigError, InputError
from cpmtool.quant.config import QATConfig
from cpmtool.quant.ternary import Ternary, file_bytes, pack_model, save_ternary, ternary_stats
from cpmtool.train import losses
from cpmtool.train.checkpoint import load_for_training
from cpmtool.train.sft import SFTRecipe, collate

TASK_LEVELS = (1, 2, 3)  # cpm-tiny's trained levels: 4 and 5 are ~0% in full precision already


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Mean over labelled positions of KL(p_teacher || p_student) at `temperature`, times T^2.

    logits (B, T, V); labels (B, T) with -100 where no target (the positions the CE ignores).
    """
    mask = labels != -100  # (B, T)
    s = F.log_softmax(student_logits[mask].float() / temperature, -1)  # (n, V)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # (n,)
    return kl.sum() / max(int(mask.sum()), 1) * temperature ** 2


def text_example(tokenizer, record: dict, eos: int, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of a plain document: every next token is a target, EOS appended."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InputError("no_text")
    ids = (tokenizer.encode(text, add_special_tokens=False) + [eos])[:max_len]
    if len(ids) < 2:
        raise InputError("nothing_to_learn")
    return ids, ids[1:] + [-100]


def as_sft_record(record: dict) -> dict:
    """A task record with a worked `solution` (cpmtool models tasks --solution) as an SFT record."""
    if isinstance(record.get("solution"), str) and "completion" not in record:
        msgs = record.get("messages") or [{"role": "user", "content": record.get("prompt", "")}]
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            return {**record, "messages": [*msgs, {"role": "assistant", "content": record["solution"]}]}
    return record


@torch.no_grad()
def perplexity(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy over the labelled tokens of `examples`)."""
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        ids, labels, pos = collate([[e] for e in examples[i:i + batch_size]], pad_id, dev)
        loss, n = losses.sft_loss(model(ids, pos), labels)
        total += float(loss) * n
        count += n
    return math.exp(total / max(count, 1))


def task_records(n: int) -> list[dict]:
    from cpmtool.data import tasks

    return list(tasks.generate("arithmetic", "test", n, 0, level=list(TASK_LEVELS))) if n else []


def task_accuracy(model, tokenizer, records: list[dict]) -> float:
    from cpmtool.model.tiny import evaluate_tasks

    return evaluate_tasks(model, tokenizer, records, max_new_tokens=128)


def _is_cpm_tiny(name: str) -> bool:
    from cpmtool.model.loader import resolve

    card = resolve(name) / "card.json"
    try:
        return name == "cpm-tiny" or json.loads(card.read_text()).get("name") == "cpm-tiny"
    except (OSError, ValueError):
        return False


class QATRecipe(SFTRecipe):
    """train-sft's recipe on a model whose block linears are `TernaryLinear`."""

    per_example = False  # the distillation compares the (B, T, V) logits of the collated rows

    def __init__(self, cfg: QATConfig, log=None):
        super().__init__(cfg, log)
        self.scheme = Ternary(self.cfg.group_size, self.cfg.act_bits)
        self.heldout: list[dict] = []

    def records(self, records):
        recs = list(records)
        if not self.cfg.eval_data and self.cfg.eval_n:
            if len(recs) <= self.cfg.eval_n:
                raise InputError(f"{self.cfg.data}: {len(recs)} records, not enough to hold out --eval-n "
                                 f"{self.cfg.eval_n} for perplexity (give --eval-data or a smaller --eval-n)")
            recs, self.heldout = recs[:-self.cfg.eval_n], recs[-self.cfg.eval_n:]
        return recs

    def example(self, record: dict):
        from cpmtool.train.sequences import sft_example

        if "text" in record and not any(k in record for k in ("messages", "prompt", "completion")):
            return text_example(self.tokenizer, record, self.eos, self.cfg.max_len)
        return sft_example(self.tokenizer, as_sft_record(record), self.eos, self.cfg.max_len)

    def setup(self) -> None:
        super().setup()  # the FP model, data, optimizer (its Parameters survive the layer swap)
        from cpmtool.model.transformer import block_linears

        if any(hasattr(getattr(p, a), "weight_packed") for _, p, a in block_linears(self.model)):
            raise ConfigError(f"--model {self.cfg.model} is already ternary (packed); QAT starts from the "
                              f"full-precision model it was made from")
        self.scheme.check(self.model)
        self.teacher = None
        if self.cfg.distill:
            # owning its memory: an mmap-backed teacher would change under us if the checkpoint is rewritten
            self.teacher, _ = load_for_training(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device)
            self.teacher.eval()
            self.teacher.requires_grad_(False)

    def eval_examples(self) -> list:
        from cpmtool.io import read_records

        recs = list(read_records(self.cfg.eval_data))[:self.cfg.eval_n] if self.cfg.eval_data else self.heldout
        out = []
        for r in recs:
            try:
                out.append(self.example(r))
            except InputError:
                pass
        return out

    def loss(self, ids, labels, pos):
        logits = self.ddp(ids, pos)  # (B, T, V)
        ce, _ = losses.sft_loss(logits, labels)
        if self.teacher is None:
            return ce, {}
        import contextlib

        from cpmtool.train.sft import packed

        with torch.no_grad(), packed(self.teacher) if self.cfg.pack else contextlib.nullcontext():
            t_logits = self.teacher(ids, pos)  # (B, T, V)
        kl = distill_kl(logits, t_logits, labels, self.cfg.distill_temperature)
        return ce + self.cfg.distill_weight * kl, {"ce": round(float(ce.detach()), 5), "kl": round(float(kl.detach()), 5)}

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        mult = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "wsd":
            decay = int(0.3 * self.total)
            if decay and step > self.total - decay:
                mult *= 0.1 ** ((step - (self.total - decay)) / decay)
        return cfg.lr * mult

    def save_final(self) -> None:
        from cpmtool.train.runlog import plot_curves, read_metrics

        save_ternary(self.model, self.out / "model", self.scheme, tokenizer=self.tokenizer,
                     keep_dtype=self.cfg.keep_dtype)
        plot_curves(read_metrics(self.metrics.path), self.out / "curves.png", title="quantize-ternary")


def _evaluate(model, tokenizer, examples, pad_id, task_recs) -> dict:
    t0 = time.time()
    model.eval()
    res = {"heldout_ppl": round(perplexity(model, examples, pad_id), 4) if examples else None}
    if task_recs:
        res["arithmetic_accuracy"] = round(task_accuracy(model, tokenizer, task_recs), 4)
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def quantize_ternary(cfg: QATConfig, log=None) -> dict:
    """Evaluate the FP model and its naive ternarisation, run QAT, pack, evaluate the packed file.

    Returns the card (also written as <out>/card.json and <out>/README.md; the packed model is <out>/model).

    Raises:
        ConfigError, InputError, ModelError.
    """
    from cpmtool.model.loader import load_model

    log = log or (lambda d: None)
    t_start = time.time()
    recipe = QATRecipe(cfg, log)
    try:
        recipe.setup()
        cfg = recipe.cfg
        eval_ex = recipe.eval_examples()
        want_task = cfg.eval_task == "arithmetic" or (cfg.eval_task == "auto" and _is_cpm_tiny(cfg.model))
        task_recs = task_records(cfg.eval_task_n) if want_task else []
        fp = recipe.teacher
        if fp is None:
            fp, _ = load_for_training(cfg.model, dtype=cfg.dtype, device=cfg.device)
            fp.eval()
        evals = {"full_precision": _evaluate(fp, recipe.tokenizer, eval_ex, recipe.pad_id, task_recs)}
        log({"event": "eval", "note": f"full precision {evals['full_precision']}"})
        evals["ptq_naive"] = _evaluate(pack_model(fp, recipe.scheme), recipe.tokenizer, eval_ex, recipe.pad_id,
                                       task_recs)
        log({"event": "eval", "note": f"naive ternary {evals['ptq_naive']}"})
        stats = ternary_stats(fp, recipe.scheme)
        del fp
        recipe.scheme.convert_for_qat(recipe.model)
        recipe.model.train()
        t_train = time.time()
        result = recipe.train()
        train_s = time.time() - t_train
        if not recipe.dist.main:
            return result
        packed, _ = load_model(recipe.out / "model", dtype=cfg.dtype, device=cfg.device)  # the file, as served
        evals["qat"] = _evaluate(packed, recipe.tokenizer, eval_ex, recipe.pad_id, task_recs)
        log({"event": "eval", "note": f"after QAT {evals['qat']}"})
    finally:
        if hasattr(recipe, "dist"):
            recipe.cleanup()
    card = make_card(cfg, evals, stats, file_bytes(recipe.out / "model"), result, len(eval_ex), len(task_recs),
                     train_s, time.time() - t_start)
    write_card(recipe.out, card)
    write_card(recipe.out / "model", card)
    return card


def make_card(cfg: QATConfig, evals: dict, stats: dict, packed_bytes: int, result: dict, n_ppl: int, n_task: int,
              train_s: float, total_s: float) -> dict:
    fp, qat = evals["full_precision"], evals["qat"]
    card = {
        "name": f"{Path(str(cfg.model)).name}-ternary",
        "method": "BitCPM / BitNet b1.58 ternary QAT (absmean weights, per-token absmax activations, STE)",
        "base_model": cfg.model,
        "format": Ternary(cfg.group_size, cfg.act_bits).metadata()["cpmtool.quant"],
        "group_size": cfg.group_size, "act_bits": cfg.act_bits,
        "steps": result["steps"], "distill": cfg.distill, "lr": cfg.lr, "batch_size": cfg.batch_size,
        "eval": evals,
        "heldout_records": n_ppl, "task_records": n_task,
        "bits_per_weight": stats["bits_per_weight"],
        "quantized_weights": stats["quantized_weights"], "kept_weights": stats["kept_weights"],
        "file_bytes": packed_bytes, "bf16_bytes": stats["bf16_bytes"],
        "size_vs_bf16": round(packed_bytes / stats["bf16_bytes"], 4),
        "train_seconds": round(train_s, 1), "total_seconds": round(total_s, 1),
        "final_loss": (result.get("last") or {}).get("loss"),
    }
    if fp.get("arithmetic_accuracy"):
        card["qat_recovery"] = round(qat["arithmetic_accuracy"] / fp["arithmetic_accuracy"], 4)
        card["ptq_recovery"] = round(evals["ptq_naive"]["arithmetic_accuracy"] / fp["arithmetic_accuracy"], 4)
    card["command"] = _command(cfg)
    return card


def _command(cfg: QATConfig) -> str:
    import sys

    return " ".join(["cpmtool", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("cpmtool") else (
        f"cpmtool quantize-ternary --model {cfg.model} --data {cfg.data} --steps {cfg.steps} --out {cfg.out}")


def write_card(out: Path, card: dict) -> None:
    """card.json and a README.md with the before/after table."""
    out = Path(out)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    rows = [("full precision", card["eval"]["full_precision"]), ("naive ternary (PTQ)", card["eval"]["ptq_naive"]),
            ("ternary QAT", card["eval"]["qat"])]
    has_task = any("arithmetic_accuracy" in r for _, r in rows)
    head = "| model | held-out perplexity |" + (" arithmetic accuracy |" if has_task else "")
    lines = [head, "|---|---|" + ("---|" if has_task else "")]
    for name, r in rows:
        ppl = "-" if r.get("heldout_ppl") is None else f"{r['heldout_ppl']:.3f}"
        acc = f" {r['arithmetic_accuracy']:.1%} |" if has_task else ""
        lines.append(f"| {name} | {ppl} |{acc}")
    text = f"""# {card['name']}

Ternary ({card['format']}) version of `{card['base_model']}`: block linear weights in {{-1, 0, +1}}
(group size {card['group_size'] or 'per tensor'}, activations {card['act_bits']}-bit), embeddings,
norms and LM head kept. {card['steps']} QAT steps{' with distillation' if card['distill'] else ''}.

{chr(10).join(lines)}

Held-out perplexity over {card['heldout_records']} records{f"; arithmetic accuracy: greedy on {card['task_records']} test problems (levels 1-3)" if has_task else ''}.
The QAT row is measured on the packed file as `load_model` reads it.

- bits per quantised weight: {card['bits_per_weight']} ({card['quantized_weights']} weights; {card['kept_weights']} kept)
- file: {card['file_bytes']} bytes, {card['size_vs_bf16']:.1%} of the bf16 model ({card['bf16_bytes']} bytes)

Command: `{card['command']}`
"""
    (out / "README.md").write_text(text)
