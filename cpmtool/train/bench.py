"""`cpmtool bench train-rl`: our GRPO trainer against TRL's GRPOTrainer on the same configuration.

Both sides train the same checkpoint (a MiniCPM is exported to its exact Llama equivalent for
transformers/TRL) on the same prompts with the same group size, prompts per step, completion
length, learning rate, temperature and number of steps, the same torch thread count, the same
device (`cpu`, or `cuda`: our native engine rolls out on the GPU, TRL generates with transformers'
`generate` there, its default without vLLM), fp32, no gradient checkpointing, no KL. Each step is
rollout + reward + one policy update. The first `warmup` steps are not timed. Throughput = trained
samples (completions) per second of step time.

Each trainer runs in its own worker process, started once (spawn) and kept for all rounds. What
one trainer leaves in its process (our trainer's glibc malloc thresholds, `train.cpu_heap`; heap
and thread-pool state) is then not inherited by the other. Each side runs as a user would run it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from cpmtool.bench import check_device
from cpmtool.errors import ConfigError, require

COMPARE = ("trl",)


def _prompts(path: str | None, count: int, seed: int) -> list[dict]:
    if path:
        from cpmtool.io import RunStats, read_records

        recs = list(read_records(path, stats=RunStats()))
        if not recs:
            raise ConfigError(f"{path}: no prompt records")
        return [recs[i % len(recs)] for i in range(count)]
    from cpmtool.data import tasks

    return list(tasks.generate("arithmetic", "train", count, seed, level=[1, 2, 3]))


def _ours(model: str, prompts_file: Path, out: Path, *, batch_size, n, max_tokens, steps, warmup, lr, threads,
          seed, device="cpu") -> dict:
    from cpmtool.train.config import RLConfig
    from cpmtool.train.rl import train_rl
    from cpmtool.train.runlog import read_metrics

    cfg = RLConfig(model=model, prompts=str(prompts_file), out=str(out), algo="grpo", steps=warmup + steps,
                   batch_size=batch_size, n=n, max_tokens=max_tokens, lr=lr, threads=threads, seed=seed,
                   weight_decay=0.0, keep_checkpoints=1, device=device)
    train_rl(cfg)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) > warmup]
    secs = sum(r["step_time"] for r in rows)
    samples = sum(r["groups_kept"] * n for r in rows)
    toks = sum(r["gen_tokens"] for r in rows)
    # where a step's time goes: the rollout (generation and reward) and the update
    split = {f"{k}_per_step": round(sum(r[k] for r in rows) / len(rows), 3) for k in ("rollout_s", "update_s")}
    return {"trainer": "cpmtool", "steps": len(rows), "samples": samples, "seconds": round(secs, 3),
            "samples_per_s": round(samples / secs, 3), "completion_tokens_per_s": round(toks / secs, 1),
            "mean_completion_tokens": round(toks / max(samples, 1), 1), **split}


def _trl(model: str, records: list[dict], out: Path, *, batch_size, n, max_tokens, steps, warmup, lr, seed,
         device="cpu") -> dict:
    trl = require("trl", extra="trl", purpose="cpmtool bench train-rl --compare trl")
    datasets = require("datasets", extra="trl", purpose="cpmtool bench train-rl --compare trl")
    import transformers

    from cpmtool.model.loader import read_config, resolve
    from cpmtool.model.tokenizer import load_tokenizer
    from cpmtool.rewards import load_reward

    path = resolve(model)
    if path.is_dir() and read_config(path).family == "minicpm":  # TRL needs a transformers model: the exact Llama
        from cpmtool.model.export import export_llama

        path = export_llama(model, out / "llama")
    tok = load_tokenizer(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    reward = load_reward("math")
    data = datasets.Dataset.from_list([
        {"prompt": r.get("messages") or [{"role": "user", "content": r["prompt"]}], "answer": str(r.get("answer")),
         "task": str(r.get("task") or "")} for r in records])

    def grade(prompts, completions, answer, task, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(reward({"answer": a, "task": t or None}, x)[0] or 0.0)
                for a, t, x in zip(answer, task, texts, strict=True)]

    times: list[float] = []
    lengths: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    args = trl.GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=batch_size * n, num_generations=n,
        max_completion_length=max_tokens, max_steps=warmup + steps, learning_rate=lr, weight_decay=0.0,
        lr_scheduler_type="constant", temperature=1.0, top_p=1.0, beta=0.0, num_iterations=1, loss_type="dapo",
        use_cpu=device == "cpu", bf16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", seed=seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    trainer = trl.GRPOTrainer(model=m, reward_funcs=grade, args=args, train_dataset=data, processing_class=tok,
                              callbacks=[Timer()])
    trainer.remove_callback(transformers.PrinterCallback)  # it prints the logs on stdout, which carries data only
    trainer.train()
    timed = times[warmup:]
    secs = sum(timed)
    samples = len(timed) * batch_size * n
    mean_len = sum(lengths[warmup:]) / max(len(lengths[warmup:]), 1) if lengths else None
    row = {"trainer": "trl", "trl_version": trl.__version__, "steps": len(timed), "samples": samples,
           "seconds": round(secs, 3), "samples_per_s": round(samples / secs, 3) if secs else None,
           "mean_completion_tokens": round(mean_len, 1) if mean_len else None}
    if mean_len:
        row["completion_tokens_per_s"] = round(samples * mean_len / secs, 1)
    return row


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker(threads: int):
    """A one-process pool for one trainer's rounds, at the parent's torch thread count."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_set_threads,
                               initargs=(threads,))


def _summary(runs: list[dict]) -> dict:
    """One trainer's rounds -> its row: the median round, with every round's samples/s kept."""
    row = dict(sorted(runs, key=lambda r: r["samples_per_s"] or 0.0)[len(runs) // 2])
    if len(runs) > 1:
        row["rounds"] = len(runs)
        row["samples_per_s_runs"] = [r["samples_per_s"] for r in runs]
    return row


def bench_train_rl(model: str = "cpm-tiny", *, prompts: str | None = None, compare: str | None = "trl",
                   batch_size: int = 8, n: int = 8, max_tokens: int = 64, steps: int = 3, warmup: int = 1,
                   lr: float = 1e-5, threads: int = 0, seed: int = 0, repeat: int = 1, device: str = "cpu",
                   on_row=None, progress=None) -> list[dict]:
    """Time the same GRPO configuration in our trainer and (with `compare="trl"`) in TRL.

    Returns one row per trainer (samples/s, seconds, steps, completion tokens/s; ours also the mean
    rollout and update seconds per step) and, with a comparison, a row with the ratio ours /
    theirs. With `repeat` R > 1 the two trainers run in turn R times (same seed, so the same work
    each round); a trainer's row is its median round and the ratio is the median of the R
    per-round ratios, so a slow spell of a shared machine lands on both sides of one round instead
    of on one trainer. Each trainer runs in its own worker process (see the module's docstring).
    `device` is where both trainers run: "cpu" or "cuda" (fp32 on either).
    `on_row(row)` sees each final row; `progress(text)` each round's figures.

    Raises:
        ConfigError: bad sizes, an unknown comparison or device, or "cuda" without a CUDA device.
        MissingDependencyError: `trl` (or `datasets`) is not installed (pip install 'cpmtool[trl]').
    """
    import json
    import statistics

    import torch

    if compare not in (None, "", *COMPARE):
        raise ConfigError(f"--compare {compare!r}: valid: {', '.join(COMPARE)}")
    if min(batch_size, n, max_tokens, steps, repeat) < 1 or warmup < 0:
        raise ConfigError("--batch-size, --n, --max-tokens, --steps and --repeat must be >= 1, --warmup >= 0")
    check_device(device)
    if compare:  # fail before the first timing, not after it
        require("trl", extra="trl", purpose="cpmtool bench train-rl --compare trl")
    if threads:
        torch.set_num_threads(threads)
    records = _prompts(prompts, batch_size * (warmup + steps), seed)
    common = {"model": model, "batch_size": batch_size, "n": n, "max_tokens": max_tokens, "lr": lr,
              "threads": torch.get_num_threads(), "device": device}
    ours_runs: list[dict] = []
    theirs_runs: list[dict] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cpmtool-bench-rl-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        pfile = tmp / "prompts.jsonl"
        pfile.write_text("".join(json.dumps(r) + "\n" for r in records))
        ours_w = stack.enter_context(_worker(common["threads"]))
        trl_w = stack.enter_context(_worker(common["threads"])) if compare == "trl" else None
        for rnd in range(repeat):
            ours_runs.append(ours_w.submit(
                _ours, model, pfile, tmp / f"ours{rnd}", batch_size=batch_size, n=n, max_tokens=max_tokens,
                steps=steps, warmup=warmup, lr=lr, threads=threads, seed=seed, device=device).result())
            line = f"round {rnd + 1}/{repeat}: cpmtool {ours_runs[-1]['samples_per_s']:.2f} samples/s"
            if trl_w is not None:
                theirs_runs.append(trl_w.submit(
                    _trl, model, records, tmp / f"trl{rnd}", batch_size=batch_size, n=n, max_tokens=max_tokens,
                    steps=steps, warmup=warmup, lr=lr, seed=seed, device=device).result())
                if theirs_runs[-1].get("samples_per_s"):
                    ratios.append(ours_runs[-1]["samples_per_s"] / theirs_runs[-1]["samples_per_s"])
                    line += f", trl {theirs_runs[-1]['samples_per_s']:.2f} samples/s, x{ratios[-1]:.2f}"
            if progress:
                progress(line)
    rows = [{**_summary(ours_runs), **common}]
    if compare == "trl":
        theirs = {**_summary(theirs_runs), **common}
        rows.append(theirs)
        ratio = {"trainer": "ratio", "samples_per_s_ratio": round(statistics.median(ratios), 2) if ratios else None, **common}
        if len(ratios) > 1:
            ratio["rounds"] = len(ratios)
            ratio["ratio_runs"] = [round(x, 2) for x in ratios]
        ours = rows[0]
        if ours.get("completion_tokens_per_s") and theirs.get("completion_tokens_per_s"):
            ratio["completion_tokens_per_s_ratio"] = round(
                ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"], 2)
        rows.append(ratio)
    if on_row:
        for r in rows:
            on_row(r)
    return rows
