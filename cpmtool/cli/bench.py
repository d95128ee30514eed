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
