"""`bench eval`: pick test prompts, roll them out through the engine layer, return the graded samples.

    samples = evaluate("cpm-tiny", "arithmetic", n_prompts=50, n=8, temperature=1.0)
    rows = score_samples(samples)   # cpmtool.bench.score

Data: `arithmetic` / `countdown` (the test split of cpm-tiny's synthetic tasks, `cpmtool.data.tasks`),
`gsm8k` (gsm8k_test.jsonl from the shared data directory), or a JSONL file of prompt records with a
gold `answer`. The rollout is `cpmtool.data.rollout.rollout` with the math verifier, so the samples
are exactly what `cpmtool rollout --reward math` writes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from cpmtool.errors import ConfigError, InputError
from cpmtool.io import RunStats, read_records

GSM8K = "gsm8k_test.jsonl"


def shared_data(name: str) -> Path:
    """A file of the shared data directory: $CPMTOOL_DATA/name, else shared/data/name beside the repo."""
    candidates = [Path(os.environ["CPMTOOL_DATA"]) / name] if os.environ.get("CPMTOOL_DATA") else []
    candidates += [p / "shared" / "data" / name for p in Path(__file__).resolve().parents]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"cannot find {name} (set CPMTOOL_DATA to the directory that holds it, or pass --data FILE)")


def eval_prompts(data: str, n_prompts: int, *, level: Sequence[int] | None = None, seed: int = 0,
                 prompt_field: str = "prompt") -> list[dict]:
    """The first `n_prompts` prompt records of `data` (see the module docstring)."""
    from cpmtool.data import tasks

    if data in tasks.TASKS:
        return list(tasks.generate(data, "test", n_prompts, seed=seed, level=list(level) if level else None))
    if data == "gsm8k":
        path = shared_data(GSM8K)
        out = []
        for i, r in enumerate(read_records(path, stats=RunStats())):
            if len(out) >= n_prompts:
                break
            out.append({"id": f"gsm8k-test-{i}", "prompt": r["question"], "answer": r["answer"]})
        return out
    if not Path(data).is_file():
        raise ConfigError(f"--data {data!r}: not arithmetic, countdown, gsm8k or an existing file")
    if level:
        raise ConfigError("--level is for --data arithmetic or countdown")
    out = []
    for r in read_records(data, stats=RunStats()):
        if r.get("answer") is None or not (r.get("messages") or r.get(prompt_field)):
            continue  # nothing to grade or nothing to ask; rollout would reject or not grade it
        out.append(r)
        if len(out) >= n_prompts:
            break
    if not out:
        raise InputError(f"{data}: no records with `{prompt_field}` (or `messages`) and `answer`")
    return out


class _Counted:
    """An engine that reports each finished group to `on_done(samples)`; everything else is delegated."""

    def __init__(self, engine, on_done: Callable[[int], None]):
        self._engine = engine
        self._on_done = on_done

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_stream(self, requests, params=None) -> Iterator:
        for result in self._engine.generate_stream(requests, params):
            self._on_done(len(result.completions))
            yield result


def evaluate(model: str, data: str = "arithmetic", *, n_prompts: int = 50, level: Sequence[int] | None = None,
             n: int = 1, temperature: float = 0.0, max_tokens: int = 256, seed: int = 0, engine: str = "native",
             api_base: str | None = None, api_key: str | None = None, chat: bool = True,
             prompt_field: str = "prompt", max_batch: int = 64, output: str | Path | None = None,
             threads: int | None = None, progress: bool | None = None) -> list[dict]:
    """Sample `n` completions for each of the first `n_prompts` prompts of `data` and grade them.

    Args:
        model, engine, api_base, api_key, max_batch: as for `cpmtool rollout`.
        data: arithmetic | countdown | gsm8k | a JSONL path.
        n_prompts, level, seed: which prompts (seed also seeds the sampling).
        n, temperature, max_tokens: sampling.
        chat: plain prompts through the chat template; prompt_field: the prompt field of a file.
        output: keep the sample records in this JSONL file (else a temporary file).
        threads: torch CPU threads (default: torch's).
        progress: a progress bar on stderr (None: when stderr is a TTY or --progress).

    Returns:
        The sample records, as `cpmtool rollout --reward math` writes them.
    """
    from cpmtool.data.rollout import rollout
    from cpmtool.engine import load_engine
    from cpmtool.io import progress_enabled

    prompts = eval_prompts(data, n_prompts, level=level, seed=seed, prompt_field=prompt_field)
    if threads:
        import torch

        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="cpmtool-eval-") as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in prompts))
        dst = Path(output) if output else Path(tmp) / "samples.jsonl"
        eng = load_engine(model, engine, api_base=api_base, api_key=api_key, max_batch=max_batch)
        bar = _bar(len(prompts) * n, f"{model} on {Path(data).name}") if progress_enabled(progress) else None
        try:
            counted = _Counted(eng, bar[1] if bar else (lambda k: None))
            rollout([str(src)], str(dst), model=model, engine=counted, n=n, max_tokens=max_tokens,
                    temperature=temperature, seed=seed, reward="math", chat=chat, prompt_field=prompt_field,
                    max_batch=max_batch, progress=False)
        finally:
            if bar:
                bar[0].stop()
        return list(read_records(dst, stats=RunStats()))


def _bar(total: int, what: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=Console(file=sys.stderr), transient=True)
    task = p.add_task(what, total=total)
    p.start()
    return p, lambda k: p.advance(task, k)
