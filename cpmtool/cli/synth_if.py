"""`cpmtool synth-if ...`: UltraIF data synthesis (library: cpmtool.data.synth_if)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _group():
    """Synthesise instruction-following data (UltraIF): decompose -> compose -> generate -> filter.

    Each subcommand reads JSONL records (files or - for stdin) and writes JSONL to stdout or -o.
    Model answers are cached on disk (--cache, default $CPMTOOL_HOME/cache), so a rerun with the
    same inputs and settings makes no model calls.
    """


FILES = typer.Argument(None, help="Input records (JSONL, .zst/.gz ok); - or none for stdin.")
OUTPUT = typer.Option("-", "-o", "--output", help="Output records (JSONL); - is stdout.")
MODEL = typer.Option("smollm2-135m", "--model", "-m",
                     help="Registry name, HF directory or .gguf (native); the served model name (openai).")
ENGINE = typer.Option("native", "--engine", help="native | vllm | openai.")
API_BASE = typer.Option(None, "--api-base", help="OpenAI-compatible server URL (--engine openai).")
API_KEY = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer key (--engine openai).")
CACHE = typer.Option(None, "--cache", help="Answer cache directory (default $CPMTOOL_HOME/cache).")
NO_CACHE = typer.Option(False, "--no-cache", help="Send every request to the model; store nothing.")
MAX_BATCH = typer.Option(16, "--max-batch", help="Sequences per model call (decoded together, native).")
TOP_P = typer.Option(1.0, "--top-p")
SEED = typer.Option(0, "--seed", help="Seed; each request's seed is derived from it and the record id.")
REJECTS = typer.Option(None, "--rejects", help="Rejected records with reject_reason (and the model's raw answer).")
STATS = typer.Option(None, "--stats", help="Stats JSON (in, out, rejected by reason, cache hits/misses/calls).")
STRICT = typer.Option(False, "--strict", help="Stop at the first rejected record.")


def _model(**kw) -> dict:
    return {"model": kw["model"], "engine": kw["engine"], "api_base": kw["api_base"], "api_key": kw["api_key"],
            "cache": kw["cache"], "no_cache": kw["no_cache"], "max_batch": kw["max_batch"]}


def _io(**kw) -> dict:
    return {"rejects": kw["rejects"], "stats_path": kw["stats"], "strict": kw["strict"]}


@app.command("decompose")
def decompose_cmd(
    files: list[str] = FILES, output: str = OUTPUT, model: str = MODEL, engine: str = ENGINE, api_base: str = API_BASE,
    api_key: str = API_KEY, cache: str = CACHE, no_cache: bool = NO_CACHE, max_batch: int = MAX_BATCH,
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most new tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy (UltraIF's setting)."),
    top_p: float = TOP_P, seed: int = SEED,
    questions: bool = typer.Option(True, "--questions/--no-questions", help="Ask one evaluation question per constraint."),
    prefill: str = typer.Option(None, "--prefill", help="Start the model's answer with this text (e.g. "
                                "'{\"Complex\": true, \"Basic Query\": \"'); needs the model's tokenizer."),
    rejects: str = REJECTS, stats: str = STATS, strict: bool = STRICT,
):
    """Split real prompts into a basic query, constraints and evaluation questions.

    Reads records with `prompt`, `query` or Alpaca's `instruction` (+ `input`); adds `query`,
    `basic_query`, `constraints` [{type, constraint, simplified_query, question}] and
    `eval_questions`. A malformed answer is a reject (`unparsable_decomposition`, `no_constraints`)
    carrying the raw text in `raw`; JSON cut off by --max-tokens or with a stray bracket is
    repaired first. A small model answers in JSON far more often with --prefill starting the object.

    Example: cpmtool synth-if decompose --model smollm2-135m alpaca_seed.jsonl -o dec.jsonl --rejects rej.jsonl
    """
    from cpmtool.data.synth_if import decompose

    decompose(files or ["-"], output, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
              questions=questions, prefill=prefill, **_model(**locals()), **_io(**locals()))


@app.command("compose")
def compose_cmd(
    files: list[str] = FILES, output: str = OUTPUT,
    pool: list[str] = typer.Option([], "--pool", help="Decomposed records whose constraints may be added (repeatable)."),
    rounds: int = typer.Option(3, "--rounds", help="Constraints added per query, one per round."),
    pool_ratio: float = typer.Option(0.5, "--pool-ratio", help="Chance a round draws from --pool rather than IFEval."),
    ifeval_ids: str = typer.Option(None, "--ifeval-ids", help="Comma-separated IFEval ids to draw from (default all 25)."),
    seed: int = SEED, rejects: str = REJECTS, stats: str = STATS, strict: bool = STRICT,
):
    """Add constraints to each query, iteratively: from the decomposed pool and IFEval's library.

    Each round adds one constraint compatible with those before it. An IFEval constraint gets
    random parameters, its instruction text, and `instruction_id_list`/`kwargs` so the checkers
    (and `rollout --reward ifeval`) can verify it; a pool constraint brings its evaluation
    question. Writes `prompt` (query + constraints), `query`, `added_constraints`, `eval_questions`.

    Example: cpmtool synth-if compose --pool dec.jsonl --rounds 2 dec.jsonl -o comp.jsonl
    """
    from cpmtool.data.synth_if import compose

    ids = [x.strip() for x in ifeval_ids.split(",") if x.strip()] if ifeval_ids else None
    compose(files or ["-"], output, pool=pool or None, rounds=rounds, pool_ratio=pool_ratio, ifeval_ids=ids,
            seed=seed, **_io(**locals()))


@app.command("generate")
def generate_cmd(
    files: list[str] = FILES, output: str = OUTPUT,
    k: int = typer.Option(4, "--k", help="Responses per prompt."),
    model: str = MODEL, engine: str = ENGINE, api_base: str = API_BASE, api_key: str = API_KEY, cache: str = CACHE,
    no_cache: bool = NO_CACHE, max_batch: int = MAX_BATCH,
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most new tokens per response."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(0.95, "--top-p"), seed: int = SEED,
    system: str = typer.Option(None, "--system", help="A system message for every prompt."),
    rejects: str = REJECTS, stats: str = STATS, strict: bool = STRICT,
):
    """Sample k responses to each composed prompt; adds `responses` and `finish_reasons`.

    Example: cpmtool synth-if generate --k 4 --max-tokens 256 comp.jsonl -o gen.jsonl
    """
    from cpmtool.data.synth_if import generate

    generate(files or ["-"], output, k=k, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
             system=system, **_model(**locals()), **_io(**locals()))


@app.command("filter")
def filter_cmd(
    files: list[str] = FILES, output: str = OUTPUT,
    pairs: str = typer.Option(None, "--pairs", help="Preference pairs (chosen passes, rejected fails) for train-dpo."),
    drop_unsatisfied: bool = typer.Option(True, "--drop-unsatisfied/--keep-unsatisfied",
                                          help="Reject prompts with no passing response (else write the last one)."),
    loose: bool = typer.Option(False, "--loose", help="IFEval's loose checking (first/last line, * removed)."),
    model: str = MODEL, engine: str = ENGINE, api_base: str = API_BASE, api_key: str = API_KEY, cache: str = CACHE,
    no_cache: bool = NO_CACHE, max_batch: int = MAX_BATCH,
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most new tokens per judgment."),
    temperature: float = typer.Option(0.0, "--temperature", help="Judge temperature; 0 is greedy."),
    top_p: float = TOP_P, seed: int = SEED, rejects: str = REJECTS, stats: str = STATS, strict: bool = STRICT,
):
    """Check responses: IFEval checkers for verifiable constraints, an LLM judge (YES/NO) for the
    evaluation questions. Writes SFT records (`prompt`, `completion`: the first passing response)
    and, with --pairs, preference pairs (`prompt`, `chosen`, `rejected`, scores, margin).

    Example: cpmtool synth-if filter gen.jsonl -o sft.jsonl --pairs dpo.jsonl --rejects unsat.jsonl
    """
    from cpmtool.data.synth_if import filter_responses

    filter_responses(files or ["-"], output, pairs=pairs, drop_unsatisfied=drop_unsatisfied, loose=loose,
                     max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                     **_model(**locals()), **_io(**locals()))
