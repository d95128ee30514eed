"""UltraClean's efficient verification, scaled down: anneal a nearly-trained small model on
candidate data and see whether held-out loss improves over annealing on the baseline mix.

UltraClean (Ultra-FineWeb, arXiv 2505.05427) judges a corpus without pre-training from scratch:
take a model from the end of the stable phase of a WSD schedule, run only the short decay
(annealing) phase twice, once on the default mix and once with a share of it (recalled: 30%)
replaced by the candidate corpus, and compare the two models. Here:

1. Reference: a byte-level model of the cpm-tiny family (MiniCPM architecture with μP:
   scale_emb, scale_depth, dim_model_base; GQA; tied embeddings; cpm-tiny's init and its WSD
   learning rate) trained on the baseline mix through warmup and the stable phase only.
2. Anneals from that same state, same steps, same batch positions, same decaying learning
   rate: `baseline` (baseline mix only) and one per candidate (`share` of every batch from it).
3. Score: mean loss on held-out text in bits per byte; `delta_bpb = baseline - candidate`
   (positive: the candidate data helps), `helps = delta_bpb > min_delta`.

Why bytes and not cpm-tiny's tokenizer: cpm-tiny's vocabulary (320 tokens) was built for
arithmetic, so web text would fall apart into rare merges and the loss would mostly measure the
tokenizer. Bytes cover any text, and bits per byte compare across corpora as they are.
Why a held-out loss and not benchmarks: a model this small scores at chance on benchmarks; loss
on a fixed reference set of the kind of text one wants the model to learn is the signal that
moves within a few hundred steps. Use `seeds` > 1 to see the run-to-run noise beside the delta.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cpmtool.errors import InputError

BYTE_VOCAB = 256
EOS = 256  # ends every document in the byte stream
PAD = 257


@dataclass
class VerifyConfig:
    """Args:
    share: share of each annealing batch drawn from the candidate corpus.
    pretrain_steps: warmup + stable steps of the reference model on the baseline mix.
    anneal_steps: steps of each annealing run (the learning rate decays to 1/10 over them).
    seq_len / batch_size: training windows (bytes) and windows per step.
    lr: peak learning rate (μP: matrices use lr / width multiplier, as cpm-tiny).
    hidden_size / num_hidden_layers / num_attention_heads / num_key_value_heads / intermediate_size:
      the model (cpm-tiny's family; smaller defaults so a run takes minutes on 2 cores).
    eval_windows: held-out windows scored (fixed, non-overlapping, from the start of the eval text).
    seeds: independent repetitions (different init and batches); the report gives each and the mean.
    min_delta: bits per byte the candidate must gain to count as helping.
    threads: torch CPU threads (1 is faster than 2 on a machine shared with other jobs).
    """

    share: float = 0.3
    pretrain_steps: int = 300
    anneal_steps: int = 100
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-2
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    eval_windows: int = 64
    seeds: int = 1
    min_delta: float = 0.0
    threads: int = 1


def _byte_stream(texts: list[str]):
    """All documents as one (N,) long tensor of bytes, each document followed by EOS."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(t.encode("utf-8", "replace"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def _texts(path, what: str) -> list[str]:
    from cpmtool.io import RunStats, read_records

    texts = [
        r["text"]
        for r in read_records(path, stats=RunStats())
        if isinstance(r.get("text"), str) and r["text"]
    ]
    if not texts:
        raise InputError(f"{what} {path}: no documents with `text`")
    return texts


def _model(cfg: VerifyConfig, seed: int):
    import torch

    from cpmtool.model.config import ModelConfig
    from cpmtool.model.tiny import RECIPE, init_mup
    from cpmtool.model.transformer import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(
        family="minicpm",
        vocab_size=BYTE_VOCAB + 2,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        scale_emb=RECIPE["scale_emb"],
        scale_depth=RECIPE["scale_depth"],
        dim_model_base=min(RECIPE["dim_model_base"], cfg.hidden_size),
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = Transformer(config)
    init_mup(model, RECIPE["init_std"])
    return model


def _optimizer(model, lr: float):
    import torch

    width_mult = model.config.logit_divisor
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    others = [p for n, p in model.named_parameters() if p.ndim != 2 or "embed_tokens" in n]
    return torch.optim.AdamW(
        [
            {"params": matrices, "lr": lr / width_mult, "weight_decay": 0.1},
            {"params": others, "lr": lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def _batch(streams, sources, starts, seq_len):
    import torch

    # (B, T+1) windows, each from its source stream at its start
    rows = [streams[s][p : p + seq_len + 1] for s, p in zip(sources.tolist(), starts.tolist(), strict=True)]
    return torch.stack(rows)


def _train(model, opt, streams, mix, steps, cfg, gen, lr_mult, log=None):
    """`steps` updates; each batch row comes from stream k with probability mix[k]."""
    import torch
    import torch.nn.functional as F

    base = [g["lr"] for g in opt.param_groups]
    model.train()
    losses = []
    mix_t = torch.tensor(mix, dtype=torch.float)
    for step in range(steps):
        sources = torch.multinomial(mix_t, cfg.batch_size, replacement=True, generator=gen)
        highs = torch.tensor([len(streams[s]) - cfg.seq_len - 1 for s in sources.tolist()])
        starts = (torch.rand(cfg.batch_size, generator=gen) * highs).long()
        xy = _batch(streams, sources, starts, cfg.seq_len)  # (B, T+1)
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * lr_mult(step)
        logits = model(xy[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % 50 == 0:
            log({"step": step + 1, "of": steps, "loss_bpb": round(sum(losses[-50:]) / 50 / math.log(2), 4)})
    for g, b in zip(opt.param_groups, base, strict=True):
        g["lr"] = b
    return losses


def _bits_per_byte(model, stream, cfg) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    n = min(cfg.eval_windows, (len(stream) - 1) // cfg.seq_len)
    if n < 1:
        raise InputError(f"the eval text is shorter than one window ({cfg.seq_len + 1} bytes)")
    starts = torch.arange(n) * cfg.seq_len
    xy = torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # (N, T+1)
    total = 0.0
    with torch.no_grad():
        for chunk in xy.split(16):
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            ).item()
    return total / (xy.shape[0] * cfg.seq_len) / math.log(2)


def verify(
    candidates: str | Path | Sequence[str | Path],
    baseline: str | Path,
    eval_set: str | Path,
    cfg: VerifyConfig | None = None,
    log=None,
) -> dict:
    """Anneal from one reference model on the baseline and on each candidate; compare held-out loss.

    Several candidates share the reference model and the baseline anneal, so judging k corpora
    costs one pre-training and k + 1 anneals.

    Args:
        candidates: JSONL file(s) of documents whose value is in question (e.g. `cpmtool clean` output).
        baseline: JSONL documents of the default mix (pre-training and every anneal).
        eval_set: JSONL held-out documents of the kind the model should learn.
        cfg: sizes, steps and the candidate share.
        log: optional callable receiving progress dicts (the library never prints).

    Returns:
        {"reference_bpb", "baseline_bpb", "candidates": [{"candidate", "candidate_bpb", "delta_bpb",
        "helps"}], "runs", "config", "seconds"}; with one candidate also its "candidate_bpb",
        "delta_bpb", "helps" at the top. Means over seeds; per-seed numbers in "runs".

    Raises:
        InputError: a corpus without text, or one shorter than a training window.
    """
    import torch

    from cpmtool.model.tiny import wsd_lr

    cfg = cfg or VerifyConfig()
    log = log or (lambda d: None)
    paths = [candidates] if isinstance(candidates, (str, Path)) else list(candidates)
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    streams = [_byte_stream(_texts(baseline, "--baseline"))]
    streams += [_byte_stream(_texts(p, "--candidate")) for p in paths]
    held = _byte_stream(_texts(eval_set, "--eval"))
    for s, what in zip(streams, ["--baseline", *map(str, paths)], strict=True):
        if len(s) <= cfg.seq_len + 1:
            raise InputError(f"{what}: fewer bytes than one training window ({cfg.seq_len + 1})")
    k = len(streams)
    runs = []
    for seed in range(cfg.seeds):

        def say(d, seed=seed):
            log({"seed": seed, **d, "elapsed_s": round(time.time() - t0, 1)})

        model = _model(cfg, seed)
        opt = _optimizer(model, cfg.lr)
        gen = torch.Generator().manual_seed(1000 + seed)
        warm = max(1, cfg.pretrain_steps // 20)
        only_base = [1.0] + [0.0] * (k - 1)
        _train(
            model,
            opt,
            streams,
            only_base,
            cfg.pretrain_steps,
            cfg,
            gen,
            lambda s, warm=warm: min(1.0, (s + 1) / warm),
            lambda d: say({"phase": "pretrain", **d}),
        )
        result = {"seed": seed, "reference_bpb": _bits_per_byte(model, held, cfg), "candidates": []}
        say({"phase": "reference", "bpb": round(result["reference_bpb"], 4)})
        state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        for j in range(k):  # j = 0: the baseline anneal; j >= 1: candidate j
            mix = (
                only_base
                if j == 0
                else [1.0 - cfg.share if i == 0 else cfg.share if i == j else 0.0 for i in range(k)]
            )
            model.load_state_dict(state[0])
            opt.load_state_dict(copy.deepcopy(state[1]))  # load_state_dict keeps the tensors it is given
            same = torch.Generator().manual_seed(2000 + seed)  # the same batch positions in every anneal
            n = cfg.anneal_steps
            name = "baseline" if j == 0 else f"candidate {j}"
            _train(
                model,
                opt,
                streams,
                mix,
                n,
                cfg,
                same,
                lambda s, n=n: wsd_lr(s, n, 0.0, 1.0),
                lambda d, name=name: say({"phase": name, **d}),
            )
            bpb = _bits_per_byte(model, held, cfg)
            say({"phase": name, "bpb": round(bpb, 4)})
            if j == 0:
                result["baseline_bpb"] = bpb
            else:
                result["candidates"].append(
                    {"candidate_bpb": round(bpb, 5), "delta_bpb": round(result["baseline_bpb"] - bpb, 5)}
                )
        result["reference_bpb"] = round(result["reference_bpb"], 5)
        result["baseline_bpb"] = round(result["baseline_bpb"], 5)
        runs.append(result)

    def mean(values):
        return round(sum(values) / len(values), 5)

    summary = []
    for j, p in enumerate(paths):
        delta = mean([r["candidates"][j]["delta_bpb"] for r in runs])
        summary.append(
            {
                "candidate": str(p),
                "candidate_bpb": mean([r["candidates"][j]["candidate_bpb"] for r in runs]),
                "delta_bpb": delta,
                "helps": delta > cfg.min_delta,
            }
        )
    report = {
        "reference_bpb": mean([r["reference_bpb"] for r in runs]),
        "baseline_bpb": mean([r["baseline_bpb"] for r in runs]),
        "candidates": summary,
    }
    if len(summary) == 1:
        report.update({k: summary[0][k] for k in ("candidate_bpb", "delta_bpb", "helps")})
    report.update(
        {
            "runs": runs,
            "config": asdict(cfg),
            "baseline": str(baseline),
            "eval": str(eval_set),
            "seconds": round(time.time() - t0, 1),
        }
    )
    return report
