"""`cpmtool rollout`: sample completions and score them (library: cpmtool.data.rollout)."""

from __future__ import annotations

from pathlib import Path

import typer

_CUE = "\nFinal answer: \\boxed{"


def command(
    files: list[str] = typer.Argument(None, help="Prompt records (JSONL, .zst/.gz ok); - or none for stdin."),
    output: str = typer.Option("-", "-o", "--output", help="Sample records (JSONL); - is stdout."),
    model: str = typer.Option("cpm-tiny", "--model", "-m", help="Registry name, HF directory or .gguf."),
    engine: str = typer.Option("native", "--engine", help="native | vllm | openai."),
    api_base: str = typer.Option(None, "--api-base", help="OpenAI-compatible server URL (--engine openai)."),
    api_key: str = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer key (--engine openai)."),
    n: int = typer.Option(1, "--n", help="Samples per prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most new tokens per sample."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0: off."),
    min_p: float = typer.Option(0.0, "--min-p"),
    seed: int = typer.Option(None, "--seed", help="Seed; each prompt's samples get seeds derived from it and the prompt id."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    logprobs: bool = typer.Option(False, "--logprobs", help="Write token_ids and logprobs (sampled tokens)."),
    reward: str = typer.Option("none", "--reward", help="math | ifeval | none | module:function | file.py:function."),
    answer_field: str = typer.Option("answer", "--answer-field", help="Field with the gold answer."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Field with a plain prompt (e.g. question)."),
    chat: bool = typer.Option(False, "--chat", help="Send a plain prompt as a user turn through the chat template."),
    vote: bool = typer.Option(False, "--vote", help="TTRL: reward agreement with the majority answer of the n samples."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help="Chunk-wise rollout: at most C new tokens per call."),
    state: str = typer.Option(None, "--state", help="Chunk state file (unfinished trajectories)."),
    policy_version: int = typer.Option(0, "--policy-version", help="Recorded in each chunk's entry."),
    aggregate: int = typer.Option(None, "--aggregate", help="AFT: K proposals, then aggregation."),
    layers: int = typer.Option(1, "--layers", help="AFT aggregation steps."),
    aggregator_prompt: str = typer.Option(None, "--aggregator-prompt", help="Replaces the aggregator instruction."),
    budget: int = typer.Option(None, "--budget", help="Token budget B per sample."),
    budget_mode: str = typer.Option("truncate", "--budget-mode", help="truncate | force-answer."),
    answer_cue: str = typer.Option(_CUE, "--answer-cue", help="Appended at the budget (force-answer)."),
    answer_tokens: int = typer.Option(16, "--answer-tokens", help="Most answer tokens after the cue."),
    max_batch: int = typer.Option(64, "--max-batch", help="Sequences decoded together (native)."),
    rejects: str = typer.Option(None, "--rejects", help="Bad prompt records with reject_reason and line."),
    stats: str = typer.Option(None, "--stats", help="Stats JSON (in, out, rejected by reason)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record."),
):
    """Sample n completions per prompt record and grade them; one sample record per completion.

    Reads prompt records (`messages` through the chat template, or `prompt`) and writes the
    record plus completion, group, sample, reward, correct, finish_reason, n_tokens, streaming
    groups as they finish. Bad records (no prompt, malformed messages, too long) are counted
    rejects with a reason code.

    --vote: TTRL pseudo-labels; adds maj_answer, maj_ratio, maj_correct.
    --chunk-tokens C --state S: MiniCPM4 chunk-wise rollout; unfinished trajectories wait in S and
    continue on the next call (no FILES: only continue); S is removed once all have finished.
    --aggregate K --layers L: AFT propose-and-aggregate; records keep `proposals`.
    --budget B --budget-mode force-answer: stop thinking at B tokens, append --answer-cue, answer.

    Examples:

      cpmtool rollout --model cpm-tiny --n 8 --reward math tasks.jsonl | cpmtool bench score -

      cpmtool rollout --prompt-field question --reward math --temperature 0 gsm8k_test.jsonl | head

      cpmtool rollout --n 8 --vote tasks.jsonl > ttrl.jsonl

      cpmtool rollout --chunk-tokens 64 --state s.json tasks.jsonl; while [ -e s.json ]; do cpmtool rollout --chunk-tokens 64 --state s.json; done
    """
    from cpmtool.data.rollout import rollout

    if not files:
        files = [] if chunk_tokens and state and Path(state).exists() else ["-"]
    rollout(files, output, model=model, engine=engine, api_base=api_base, api_key=api_key, n=n,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            stop=stop, logprobs=logprobs, reward=reward, answer_field=answer_field, prompt_field=prompt_field,
            chat=chat, vote=vote, chunk_tokens=chunk_tokens, state=state, policy_version=policy_version,
            aggregate=aggregate, layers=layers, aggregator_prompt=aggregator_prompt, budget=budget,
            budget_mode=budget_mode, answer_cue=answer_cue, answer_tokens=answer_tokens, max_batch=max_batch, rejects=rejects, stats_path=stats, strict=strict)
