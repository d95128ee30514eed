"""Run settings of the training recipes: dataclass defaults, then a YAML file, then flags.

The dataclass fields are the CLI flags (`max_tokens` is `--max-tokens`) and their defaults; each
field's `help` metadata is its --help text. This module imports no torch, so the CLI can build its
options from it while `cpmtool --help` stays fast. The resolved config is written as `run.json`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.errors import ConfigError

ALGOS = ("grpo", "prime", "nft", "luffy", "ttrl")
ENTROPY_CONTROLS = ("none", "clip-cov", "kl-cov")
LENGTH_PENALTIES = ("none", "kimi", "sigmoid")


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RLConfig:
    # what to train, on what
    model: str = opt("cpm-tiny", "Policy: registry name, HF directory or .gguf file.")
    prompts: str = opt("", "Prompt records (JSONL: id, prompt or messages, answer, optional reference).")
    out: str = opt("", "Run directory: metrics.jsonl, curves.png, run.json, checkpoints/, model/.")
    algo: str = opt("grpo", "grpo | prime | nft | luffy | ttrl.")
    chat: bool = opt(False, "Send a plain `prompt` as a user turn through the chat template.")
    reward: str = opt("math", "Verifier: math (boxed / GSM8K / cpm-tiny tasks) or module:function.")
    steps: int = opt(20, "Policy-update steps (one rollout batch each).")
    # rollout
    batch_size: int = opt(8, "Prompts per step.")
    n: int = opt(8, "Samples per prompt (the group size). --group-size is the same flag (torchrun takes --n "
                 "for its own --nnodes).", aliases=("--group-size",))
    max_tokens: int = opt(128, "Maximum response tokens.")
    temperature: float = opt(1.0, "Rollout temperature (log-probs are taken at the same temperature).")
    top_p: float = opt(1.0, "Rollout top-p.")
    max_batch: int = opt(256, "Rows the rollout engine decodes at once.")
    # optimisation
    lr: float = opt(1e-6, "AdamW learning rate (verl default 1e-6; cpm-tiny: 1e-5, see pipelines/rlvr.mk).")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    warmup_steps: int = opt(0, "Linear learning-rate warmup steps.")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    mini_batch_size: int = opt(0, "Prompts per optimizer step (0: the whole batch, one on-policy update).")
    micro_batch_size: int = opt(0, "Rows per forward/backward (gradient accumulation; 0: the mini-batch).")
    # GRPO / DAPO
    loss_agg: str = opt("token-mean", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm.")
    clip_low: float = opt(0.2, "PPO clip below: ratio >= 1 - clip_low.")
    clip_high: float = opt(0.2, "PPO clip above: ratio <= 1 + clip_high (DAPO clip-higher: 0.28).")
    clip_c: float = opt(3.0, "Dual-clip constant for negative advantages (> 1; 0: off).")
    norm_std: bool | None = opt(None, "Divide group advantages by the std (--no-norm-std: Dr.GRPO); "
                                "default: on, off for luffy.", flag="norm-std")
    kl_coef: float = opt(0.0, "KL-loss coefficient to the frozen initial policy (0: no reference model).")
    kl_type: str = opt("low_var_kl", "KL estimator: k1 | k2 | k3 (low_var_kl) | abs, optional + suffix.")
    entropy_coeff: float = opt(0.0, "Entropy bonus coefficient.")
    dynamic_sampling: bool = opt(False, "DAPO: drop all-correct/all-wrong groups and sample more to fill the batch.")
    max_gen_batches: int = opt(10, "Dynamic sampling: most generation rounds per step (0: unlimited).")
    overlong_buffer: int = opt(0, "DAPO overlong shaping: penalty zone before max-tokens, in tokens (0: off).")
    overlong_penalty: float = opt(1.0, "DAPO overlong shaping: penalty at max-tokens.")
    length_penalty: str = opt("none", "Length-aware reward: none | kimi | sigmoid.")
    length_alpha: float = opt(0.2, "Weight of the length-aware reward term.")
    # entropy control
    entropy_control: str = opt("none", "none | clip-cov | kl-cov.")
    clip_cov_ratio: float = opt(0.0002, "Clip-Cov: fraction of tokens whose gradient is dropped.")
    clip_cov_lb: float = opt(1.0, "Clip-Cov: covariance band lower bound.")
    clip_cov_ub: float = opt(5.0, "Clip-Cov: covariance band upper bound.")
    kl_cov_ratio: float = opt(0.0002, "KL-Cov: fraction of tokens (top covariance) given the KL penalty.")
    ppo_kl_coef: float = opt(1.0, "KL-Cov: coefficient of |logp - old_logp|.")
    # PRIME
    prime_beta: float = opt(0.05, "PRIME: beta of the implicit PRM (rewards beta*log(pi_phi/pi_ref)).")
    prime_lr: float = opt(1e-6, "PRIME: learning rate of the implicit PRM.")
    prime_grad_clip: float = opt(10.0, "PRIME: gradient clip of the PRM.")
    prime_acc_lower: float = opt(0.2, "PRIME: keep prompts whose accuracy is >= this.")
    prime_acc_upper: float = opt(0.8, "PRIME: keep prompts whose accuracy is <= this.")
    prime_coef_rm: float = opt(1.0, "PRIME: weight of the process-reward returns.")
    prime_coef_gt: float = opt(1.0, "PRIME: weight of the outcome-reward returns.")
    # NFT
    nft_neg_weight: float = opt(1.0, "NFT: weight of the negative (implicit negative policy) term.")
    nft_normalize: int = opt(1, "NFT: 0 none, 1 scale by (1 - r), 2 by sqrt((1 - r)/r).")
    # LUFFY
    luffy_gamma: float = opt(0.1, "LUFFY: policy shaping f(p) = p/(p + gamma) on off-policy tokens.")
    offpolicy: str = opt("", "LUFFY: JSONL of off-policy traces (id + reference/completion); default: "
                         "each prompt's `reference`.")
    # TTRL
    vote_n: int = opt(0, "TTRL: samples voted on per prompt (0: n); the first n are trained on.")
    # chunk-wise rollout
    chunk_tokens: int = opt(0, "Chunk-wise rollout: tokens generated per trajectory per step; unfinished "
                            "trajectories continue next step, importance-weighted by their stored log-probs (0: off).")
    # evaluation, checkpoints, runtime
    eval_prompts: str = opt("", "Prompt records for greedy accuracy (at the start, every --eval-every, the end).")
    eval_every: int = opt(0, "Evaluate every N steps (0: start and end only, when --eval-prompts is given).")
    eval_n: int = opt(0, "Evaluate on the first N eval prompts (0: all).")
    eval_max_tokens: int = opt(0, "Greedy evaluation: maximum response tokens (0: --max-tokens).")
    max_minutes: float = opt(0.0, "Wall-time budget: stop early when another step and the final evaluation "
                             "would not fit (0: no limit).")
    save_every: int = opt(0, "Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = opt(2, "Checkpoints kept (the most recent).")
    resume: bool = opt(False, "Continue from the last checkpoint in --out.")
    seed: int = opt(0, "Seed of prompt order, sampling and mini-batch shuffles.")
    threads: int = opt(0, "torch CPU threads (0: torch's default).")
    dtype: str = opt("float32", "Parameter dtype: float32 | bfloat16.")
    device: str = opt("cpu", "Device: cpu | cuda.")

    def validate(self) -> RLConfig:
        p = []
        if not self.prompts:
            p.append("--prompts is required")
        if not self.out:
            p.append("--out is required")
        _choice(p, "algo", self.algo, ALGOS)
        _choice(p, "entropy-control", self.entropy_control, ENTROPY_CONTROLS)
        _choice(p, "length-penalty", self.length_penalty, LENGTH_PENALTIES)
        _choice(p, "loss-agg", self.loss_agg, ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                               "seq-mean-token-sum-norm"))
        _choice(p, "kl-type", self.kl_type.rstrip("+"), ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"))
        _choice(p, "dtype", self.dtype, ("float32", "bfloat16"))
        for name in ("steps", "batch_size", "n", "max_tokens", "ppo_epochs"):
            if getattr(self, name) < 1:
                p.append(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.clip_c and self.clip_c <= 1:
            p.append(f"--clip-c must be > 1 or 0 for off (got {self.clip_c})")
        if self.mini_batch_size < 0 or self.mini_batch_size > self.batch_size:
            p.append(f"--mini-batch-size must be in [0, --batch-size] (got {self.mini_batch_size})")
        if self.algo in ("nft", "luffy") and self.entropy_control != "none":
            p.append(f"--entropy-control {self.entropy_control} applies to the PPO-loss algorithms "
                     f"(grpo, prime, ttrl), not --algo {self.algo}")
        if self.algo in ("nft", "prime", "luffy", "ttrl") and self.n < 2:
            p.append(f"--algo {self.algo} needs --n >= 2 (groups)")
        if self.algo == "ttrl" and self.vote_n and self.vote_n < self.n:
            p.append(f"--vote-n ({self.vote_n}) must be >= --n ({self.n}): TTRL trains on the first n voted samples")
        if self.chunk_tokens and self.temperature != 1.0:
            p.append("--chunk-tokens needs --temperature 1 (behaviour log-probs are recorded at temperature 1)")
        if self.chunk_tokens and self.algo in ("luffy", "ttrl", "prime"):
            p.append(f"--chunk-tokens is supported with --algo grpo and nft, not {self.algo}")
        if self.overlong_buffer >= self.max_tokens:
            p.append(f"--overlong-buffer ({self.overlong_buffer}) must be < --max-tokens ({self.max_tokens})")
        if not 0 <= self.prime_acc_lower <= self.prime_acc_upper <= 1:
            p.append("PRIME accuracy bounds need 0 <= --prime-acc-lower <= --prime-acc-upper <= 1")
        if self.nft_normalize not in (0, 1, 2):
            p.append(f"--nft-normalize must be 0, 1 or 2 (got {self.nft_normalize})")
        if p:
            raise ConfigError(p)
        return self

    def resolved(self) -> RLConfig:
        """A copy with the algorithm-dependent defaults filled in."""
        c = dataclasses.replace(self)
        if c.norm_std is None:
            c.norm_std = c.algo != "luffy"  # LUFFY's script: grpo_use_std=False
        if c.algo == "ttrl" and not c.vote_n:
            c.vote_n = c.n
        return c


@dataclass
class SFTConfig:
    model: str = opt("cpm-tiny", "Model to fine-tune: registry name, HF directory or .gguf file.")
    data: str = opt("", "SFT records (JSONL): messages, or prompt + completion.")
    out: str = opt("", "Run directory: metrics.jsonl, curves.png, run.json, checkpoints/, model/.")
    epochs: int = opt(1, "Passes over the data.")
    steps: int = opt(0, "Stop after this many optimizer steps (0: all epochs).")
    batch_size: int = opt(8, "Sequences (or packed rows) per optimizer step.")
    max_len: int = opt(512, "Longest sequence; longer examples are truncated.")
    pack: bool = opt(False, "Pack examples into rows of --max-len tokens (attention stays within each example).")
    lr: float = opt(1e-5, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(0, "Linear learning-rate warmup steps.")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    save_every: int = opt(0, "Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = opt(2, "Checkpoints kept (the most recent).")
    resume: bool = opt(False, "Continue from the last checkpoint in --out.")
    seed: int = opt(0, "Seed of the data order.")
    threads: int = opt(0, "torch CPU threads (0: torch's default).")
    dtype: str = opt("float32", "Parameter dtype: float32 | bfloat16.")
    device: str = opt("cpu", "Device: cpu | cuda.")

    def validate(self) -> SFTConfig:
        p = []
        if not self.data:
            p.append("--data is required")
        if not self.out:
            p.append("--out is required")
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                p.append(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        _choice(p, "dtype", self.dtype, ("float32", "bfloat16"))
        if p:
            raise ConfigError(p)
        return self

    def resolved(self) -> SFTConfig:
        return dataclasses.replace(self)


@dataclass
class DPOConfig:
    model: str = opt("cpm-tiny", "Policy (and frozen reference): registry name, HF directory or .gguf file.")
    data: str = opt("", "Preference records (JSONL): prompt or messages, chosen, rejected.")
    out: str = opt("", "Run directory: metrics.jsonl, curves.png, run.json, checkpoints/, model/.")
    beta: float = opt(0.1, "DPO beta (strength of the implicit KL to the reference).")
    epochs: int = opt(1, "Passes over the data.")
    steps: int = opt(0, "Stop after this many optimizer steps (0: all epochs).")
    batch_size: int = opt(8, "Pairs per optimizer step.")
    max_len: int = opt(512, "Longest prompt + response; longer ones are truncated.")
    lr: float = opt(1e-6, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(0, "Linear learning-rate warmup steps.")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0: off).")
    save_every: int = opt(0, "Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = opt(2, "Checkpoints kept (the most recent).")
    resume: bool = opt(False, "Continue from the last checkpoint in --out.")
    seed: int = opt(0, "Seed of the data order.")
    threads: int = opt(0, "torch CPU threads (0: torch's default).")
    dtype: str = opt("float32", "Parameter dtype: float32 | bfloat16.")
    device: str = opt("cpu", "Device: cpu | cuda.")

    def validate(self) -> DPOConfig:
        p = []
        if not self.data:
            p.append("--data is required")
        if not self.out:
            p.append("--out is required")
        if self.beta <= 0:
            p.append(f"--beta must be > 0 (got {self.beta})")
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                p.append(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        _choice(p, "dtype", self.dtype, ("float32", "bfloat16"))
        if p:
            raise ConfigError(p)
        return self

    def resolved(self) -> DPOConfig:
        return dataclasses.replace(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(problems: list, flag: str, value: str, valid: tuple) -> None:
    if value not in valid:
        problems.append(f"--{flag} {value!r} is not one of: {', '.join(valid)}")


def field_type(cls, name: str):
    """The plain type of a config field: int, float, str or bool (Optional stripped)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def load_config(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """Build `cls` from its defaults, then a YAML file, then `overrides` (explicit flags).

    YAML keys may use dashes or underscores. Every value is type-checked against the field
    (ints are accepted for floats); all problems are reported together.

    Raises:
        ConfigError: unknown keys, wrong types, an unreadable file.
    """
    values: dict = {}
    problems = []
    if yaml_path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {yaml_path}: {' '.join(str(e).split())}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {yaml_path}: expected a mapping of settings")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(values) - names):
        problems.append(f"unknown setting {key!r}")
    out = {}
    for key, v in values.items():
        if key not in names:
            continue
        t = field_type(cls, key)
        if v is None and key == "norm_std":
            out[key] = v
        elif t is float and isinstance(v, int) and not isinstance(v, bool):
            out[key] = float(v)
        elif type(v) is not t:
            problems.append(f"setting {key!r} must be {t.__name__}, got {type(v).__name__} {v!r}")
        else:
            out[key] = v
    if problems:
        raise ConfigError(problems)
    return cls(**out)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
