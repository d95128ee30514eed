"""`cpmtool bench score` and `cpmtool bench eval`: quality benchmarks (library: cpmtool.bench.score,
cpmtool.bench.evaluate). Registered on the `bench` group in cpmtool/cli/bench.py."""

from __future__ import annotations

import sys

import typer


def _ints(text: str | None, flag: str) -> list[int]:
    from cpmtool.errors import ConfigError

    if not text:
        return []
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag}: not a list of integers: {text!r}") from e
    if any(v < 1 for v in vals):
        raise ConfigError(f"{flag}: every value must be >= 1 (got {text!r})")
    return vals


def _report(models: dict, *, by: str, ks: str | None, budgets: str | None, plot: str | None) -> None:
    """Score, print the table on stderr and one JSON row per model on stdout, plot when asked."""
    import orjson
    from rich.console import Console

    from cpmtool.bench.score import format_table, plot_scores, score_models
    from cpmtool.errors import InputError

    if not models:
        raise InputError("no sample records to score")
    rows = score_models(models, by=by, ks=_ints(ks, "--k"), budgets=_ints(budgets, "--budgets"))
    # a pipe or file gets the whole table, not one squeezed into 80 columns
    Console(file=sys.stderr, width=None if sys.stderr.isatty() else 240).print(format_table(rows, by=by))
    for r in rows:
        sys.stdout.write(orjson.dumps(r).decode() + "\n")
    if plot:
        for p in plot_scores(rows, models, plot, by=by):
            print(f"wrote {p}", file=sys.stderr)


def score_cmd(
    files: list[str] = typer.Argument(None, help="Sample records from `cpmtool rollout` (JSONL); - or none: stdin."),
    by: str = typer.Option("model", "--by", help="Field whose values are compared (records without it: the file's "
                           "name)."),
    k: str = typer.Option(None, "--k", help="k of pass@k and maj@k, comma-separated (default 1,2,4,... up to n)."),
    budgets: str = typer.Option(None, "--budgets", help="Token budgets, comma-separated, e.g. 64,128,256."),
    plot: str = typer.Option(None, "--plot", help="Write PNG plots to this directory."),
    rejects: str = typer.Option(None, "--rejects", help="Records that cannot be scored, with reject_reason."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record."),
):
    """Grade sample records per model: accuracy, unbiased pass@k, maj@k, and token economy (mean
    tokens, tokens per correct answer, over-length rate, accuracy under token budgets).

    pass@k is Chen et al.'s 1 - C(n-c,k)/C(n,k); maj@k votes on the answers of a prompt's first k
    samples. Under a budget B a sample longer than B tokens counts as wrong. The table goes to
    stderr, one JSON row per model to stdout.

    Example: cpmtool rollout --n 8 --reward math tasks.jsonl | cpmtool bench score --budgets 64,128 --plot plots/
    """
    from cpmtool.bench.score import load_samples

    models, stats = load_samples(files or ["-"], by=by, rejects=rejects, strict=strict)
    print(f"cpmtool: {stats.summary()}", file=sys.stderr)
    _report(models, by=by, ks=k, budgets=budgets, plot=plot)


def eval_cmd(
    model: str = typer.Option("cpm-tiny", "--model", "-m", help="Registry name, HF directory, .gguf, or the served "
                              "model (--engine openai)."),
    data: str = typer.Option("arithmetic", "--data", help="arithmetic | countdown | gsm8k | a JSONL file of prompt "
                             "records with a gold `answer`."),
    n_prompts: int = typer.Option(50, "--n-prompts", min=1, help="Prompts to evaluate (the first N)."),
    level: list[int] = typer.Option(None, "--level", help="arithmetic/countdown levels (repeatable; default all)."),
    n: int = typer.Option(1, "--n", min=1, help="Samples per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Most new tokens per sample."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (and the task generator's)."),
    engine: str = typer.Option("native", "--engine", help="native | vllm | openai."),
    api_base: str = typer.Option(None, "--api-base", help="OpenAI-compatible server URL (--engine openai)."),
    api_key: str = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer key (--engine openai)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Send plain prompts through the chat template."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Prompt field of a --data FILE."),
    max_batch: int = typer.Option(64, "--max-batch", help="Sequences decoded together (native)."),
    output: str = typer.Option(None, "--output", "-o", help="Keep the sample records in this JSONL file."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    k: str = typer.Option(None, "--k", help="k of pass@k and maj@k (default 1,2,4,... up to n)."),
    budgets: str = typer.Option(None, "--budgets", help="Token budgets, comma-separated."),
    plot: str = typer.Option(None, "--plot", help="Write PNG plots to this directory."),
):
    """Rollout and score in one command: sample --n completions for each of --n-prompts test prompts,
    grade them (math verifier) and report as `bench score` does.

    gsm8k is read from the shared data directory (gsm8k_test.jsonl; $CPMTOOL_DATA or ../shared/data
    beside the repository); --data FILE takes any prompt records with an `answer`.

    Example: cpmtool bench eval --model cpm-tiny --data arithmetic --level 1 --n-prompts 100 --n 8 --temperature 1
    """
    from cpmtool.bench.evaluate import evaluate

    samples = evaluate(model, data, n_prompts=n_prompts, level=level or None, n=n, temperature=temperature,
                       max_tokens=max_tokens, seed=seed, engine=engine, api_base=api_base, api_key=api_key,
                       chat=chat, prompt_field=prompt_field, max_batch=max_batch, output=output,
                       threads=threads)
    _report({model: samples}, by="model", ks=k, budgets=budgets, plot=plot)
