"""`cpmtool annotate-pref`: preference pairs by point-wise judging, AIR (library: cpmtool.data.air)."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    files: list[str] = typer.Argument(None, help="Instructions with responses, or rollout sample records (JSONL); "
                                                 "- or none for stdin."),
    output: str = typer.Option("-", "-o", "--output", help="Preference records (JSONL); - is stdout."),
    model: str = typer.Option("smollm2-135m", "--model", "-m",
                              help="The judge: registry name, HF directory or .gguf; the served model name (openai)."),
    engine: str = typer.Option("native", "--engine", help="native | vllm | openai."),
    api_base: str = typer.Option(None, "--api-base", help="OpenAI-compatible server URL (--engine openai)."),
    api_key: str = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer key (--engine openai)."),
    cache: str = typer.Option(None, "--cache", help="Answer cache directory (default $CPMTOOL_HOME/cache)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Send every request to the judge; store nothing."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together (native)."),
    mode: str = typer.Option("pointwise", "--mode", help="pointwise (AIR) | pairwise (UltraFeedback-style baseline)."),
    judge_samples: int = typer.Option(1, "--judge-samples", help="Judgments per response, averaged (pairwise: "
                                                                 "per comparison, majority)."),
    both_orders: bool = typer.Option(True, "--both-orders/--one-order",
                                     help="Pairwise: ask each comparison in both orders (cancels position bias)."),
    keep_top_variance: float = typer.Option(None, "--keep-top-variance",
                                            help="Keep this fraction of instructions by score variance [default: 1]."),
    variance_tail: str = typer.Option("high", "--variance-tail", help="high: keep the highest variance | low."),
    min_chosen: float = typer.Option(None, "--min-chosen", help="Lowest score of a chosen response [default: 7]."),
    margin: str = typer.Option(None, "--margin", help="lo,hi: score(chosen) - score(rejected) range [default: 1,4]."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most new tokens per judgment."),
    temperature: float = typer.Option(None, "--temperature",
                                      help="Judge temperature [default: 0, or 0.7 with --judge-samples > 1]."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0: off."),
    seed: int = typer.Option(0, "--seed", help="Seed; each judgment's seed is derived from it, the instruction and "
                                               "the response."),
    template: Path = typer.Option(None, "--template", help="Judge prompt file with {instruction} and {response} "
                                                           "({response_a}, {response_b} for pairwise)."),
    prefill: str = typer.Option(None, "--prefill", help="Start the judge's answer with this text (e.g. 'Score:'); "
                                                        "needs the judge's tokenizer."),
    prompt_field: str = typer.Option("prompt", "--prompt-field",
                                     help="Field with a plain instruction (e.g. instruction), else prompt."),
    rejects: str = typer.Option(None, "--rejects", help="Lines of instructions without a pair, with reject_reason "
                                                        "and the judge's answers."),
    stats: str = typer.Option(None, "--stats", help="Stats JSON (in, out, rejected by reason, judgments, cache)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first rejected record."),
):
    """Build preference pairs the AIR way: point-wise judging, variance filter, pair selection.

    Input: instruction records `{"id", "prompt" | "messages", "responses": [{"text", "generator"},
    ...]}`, or the sample records of `cpmtool rollout` (one line per completion; the lines of a
    `group` are one instruction, across files; the generator is the line's `generator` or `model`,
    else the file name's stem).

    A judge model scores each response alone from 1 to 10 with a short rubric (--judge-samples N
    averages N sampled judgments); an answer without a score in range is a null score that keeps
    its raw text. Instructions are ranked by the variance of their response scores and the top
    --keep-top-variance fraction kept; each yields at most one pair: chosen scores at least
    --min-chosen and the margin lies in --margin (highest chosen, then the margin nearest the
    middle). Output records carry prompt/messages, chosen, rejected, score_chosen,
    score_rejected, margin (the fields train-dpo reads) and every response's scores. The lines of
    an instruction without a pair are rejects (too_few_responses, too_few_scores, low_variance,
    no_pair). Judge answers are cached on disk: a rerun makes no model calls.

    --mode pairwise: the judge compares two responses (both orders; a verdict that flips with the
    order is a tie); scores are win fractions.

    Examples:

      cpmtool rollout -m cpm-tiny --chat a.jsonl > tiny.jsonl; cpmtool rollout -m smollm2-135m --chat a.jsonl > smol.jsonl

      cpmtool annotate-pref tiny.jsonl smol.jsonl --keep-top-variance 0.5 --rejects rej.jsonl > pairs.jsonl

      cpmtool annotate-pref --engine openai --api-base http://127.0.0.1:8000 --model judge responses.jsonl
    """
    from cpmtool.data.air import annotate_pref, parse_margin
    from cpmtool.errors import ConfigError

    text = None
    if template is not None:
        try:
            text = template.read_text()
        except OSError as e:
            raise ConfigError(f"--template {template}: {e.strerror}") from e
    annotate_pref(files or ["-"], output, model=model, engine=engine, api_base=api_base, api_key=api_key, cache=cache,
                  no_cache=no_cache, max_batch=max_batch, mode=mode, judge_samples=judge_samples,
                  both_orders=both_orders, keep_top_variance=keep_top_variance, variance_tail=variance_tail,
                  min_chosen=min_chosen, margin=None if margin is None else parse_margin(margin),
                  max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                  template=text, prefill=prefill, prompt_field=prompt_field, rejects=rejects, stats_path=stats,
                  strict=strict)
