"""Settings of `cpmtool quantize-ternary`: the SFT recipe's fields plus the ternary and evaluation ones.

No torch here: the CLI builds its flags from these fields while `cpmtool --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cpmtool.errors import ConfigError
from cpmtool.train.config import SFTConfig, opt

EVAL_TASKS = ("auto", "none", "arithmetic")


@dataclass
class QATConfig(SFTConfig):
    # SFTConfig's fields with QAT defaults (BitCPM: QAT from a trained checkpoint at a high LR)
    data: str = opt("", "Training records (JSONL): messages, prompt + completion, task records with a `solution` "
                    "(cpmtool models tasks --solution), or plain `text` documents (loss on every token).")
    out: str = opt("", "Run directory: model/ (the packed ternary model), README.md and card.json (before/after "
                   "evaluation), metrics.jsonl, curves.png, run.json, checkpoints/ (latent float weights).")
    steps: int = opt(200, "Optimizer steps (0: --epochs passes over the data).")
    batch_size: int = opt(16, "Sequences per optimizer step.")
    lr: float = opt(1e-3, "AdamW learning rate of the latent weights.")
    warmup_steps: int = opt(10, "Linear learning-rate warmup steps.")
    # ternary
    group_size: int = opt(0, "Weights per absmean scale along each row's inputs (0: one scale per tensor, "
                          "BitNet b1.58).")
    act_bits: int = opt(8, "Activation bits: 8 (per-token absmax int8, W1.58A8) or 16 (float activations).")
    distill: bool = opt(False, "Add the KL divergence to the full-precision model's next-token distribution.")
    distill_weight: float = opt(1.0, "Weight of the distillation KL (loss = CE + weight * KL).")
    distill_temperature: float = opt(1.0, "Softmax temperature of teacher and student in the KL (scaled by T^2).")
    keep_dtype: str = opt("bfloat16", "Dtype of the tensors kept unquantised in the file (embeddings, norms, "
                          "LM head): bfloat16 | float32.")
    # evaluation (card)
    eval_data: str = opt("", "Held-out records for perplexity (default: the last --eval-n records of --data, "
                         "left out of training).")
    eval_n: int = opt(64, "Held-out records for perplexity.")
    eval_task: str = opt("auto", "Task accuracy in the card: auto (arithmetic for cpm-tiny) | none | arithmetic.")
    eval_task_n: int = opt(300, "Test problems for the task accuracy (greedy; levels 1-3, cpm-tiny's trained levels).")
    lr_schedule: str = opt("wsd", "Learning rate after warmup: wsd (flat, then decay over the last 30% to 1/10) "
                           "| constant.")

    def validate(self) -> QATConfig:
        problems = []
        try:
            super().validate()
        except ConfigError as e:
            problems += list(e.problems) if hasattr(e, "problems") else [str(e)]
        if self.group_size < 0:
            problems.append(f"--group-size must be >= 0, got {self.group_size}")
        if self.act_bits not in (8, 16):
            problems.append(f"--act-bits must be 8 or 16, got {self.act_bits}")
        if self.eval_task not in EVAL_TASKS:
            problems.append(f"--eval-task {self.eval_task!r} is not one of: {', '.join(EVAL_TASKS)}")
        if self.keep_dtype not in ("bfloat16", "float32"):
            problems.append(f"--keep-dtype {self.keep_dtype!r} is not one of: bfloat16, float32")
        if self.lr_schedule not in ("wsd", "constant"):
            problems.append(f"--lr-schedule {self.lr_schedule!r} is not one of: wsd, constant")
        if self.distill_temperature <= 0:
            problems.append(f"--distill-temperature must be > 0, got {self.distill_temperature}")
        if self.eval_n < 0 or self.eval_task_n < 0:
            problems.append("--eval-n and --eval-task-n must be >= 0")
        if problems:
            raise ConfigError(problems)
        return self

    def resolved(self) -> QATConfig:
        return dataclasses.replace(self)
