"""`cpmtool clean ...`: filter, dedupe and score pre-training documents (library: cpmtool.data.clean)."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup


class _DefaultRun(TyperGroup):
    """`cpmtool clean FILES...` means `cpmtool clean run FILES...`; subcommands stay reachable."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    help="Filter, dedupe and score pre-training documents (UltraClean).\n\n"
    "cpmtool clean FILES... [OPTIONS] runs the pipeline (same as `cpmtool clean run`; see "
    "`cpmtool clean run --help`). Subcommands below train the quality classifier and run the "
    "passes of sharded dedup.",
)


@app.command("run")
def run_cmd(
    files: list[str] = typer.Argument(..., help="JSONL inputs (.zst/.gz ok); - for stdin."),
    output: str = typer.Option("-", "-o", "--output", help="Kept documents (JSONL); - is stdout."),
    stages: str = typer.Option(
        None,
        "--stages",
        help="Comma-separated stages in order; 'default' or 'none'. See `cpmtool clean stages`.",
    ),
    pipeline: str = typer.Option(
        None, "--pipeline", help="YAML pipeline file: stages in order with settings."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="STAGE.KEY=VALUE, e.g. --set gopher_quality.min_doc_words=30 (repeatable)."
    ),
    classifier: str = typer.Option(
        None, "--classifier", help="Quality classifier dir (train-classifier); adds `quality`."
    ),
    threshold: float = typer.Option(0.5, "--threshold", help="Keep documents with quality >= this."),
    shard: str = typer.Option(None, "--shard", help="i/N: process inputs i, i+N, i+2N, ..."),
    signatures: str = typer.Option(
        None, "--signatures", help="Dir for sharded dedup pass 1: write dedup keys there instead of dropping."
    ),
    rejects: str = typer.Option(
        None, "--rejects", help="Dropped documents with reject_reason '<stage>:<rule>'."
    ),
    stats: str = typer.Option(
        None, "--stats", help="Stats JSON: counts per stage and rule, dedup cluster sizes."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Stop at the first malformed line or dropped document."
    ),
):
    """Run the cleaning pipeline: kept documents to stdout, dropped ones to --rejects.

    Default stages: normalise, lang (py3langid, English), gopher_repetition, gopher_quality,
    c4, fineweb (datatrove's thresholds), exact_dedup, minhash (5-grams, 14 bands x 8 hashes).

    Examples:

      cpmtool clean raw.jsonl.zst --rejects rej.jsonl --stats stats.json | zstd > clean.jsonl.zst

      cpmtool clean raw.jsonl --stages normalise,gopher_quality,minhash --set minhash.num_buckets=20

      cpmtool clean raw.jsonl --pipeline fineweb.yaml --classifier clf --threshold 0.7

      cpmtool clean raw/*.jsonl --shard 3/8 --signatures sigs/ -o kept/3.jsonl   (then dedup-merge, dedup-apply)
    """
    from cpmtool.data.clean import clean

    clean(
        files,
        output,
        stages=stages,
        pipeline=pipeline,
        overrides=overrides,
        classifier=classifier,
        threshold=threshold,
        shard=shard,
        signatures=signatures,
        rejects=rejects,
        stats_path=stats,
        strict=strict,
    )


@app.command("stages")
def stages_cmd():
    """List the stages with their settings and defaults (use them in --set or a pipeline file).

    Example: cpmtool clean stages
    """
    import dataclasses

    from cpmtool.data.clean.pipeline import DEFAULT_STAGES, _registry

    for name, (cfg, _) in _registry().items():
        mark = " (default)" if name in DEFAULT_STAGES else ""
        print(f"{name}{mark}")
        for f in dataclasses.fields(cfg):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  {f.name} = {default!r}")
    print("quality (added by --classifier)\n  threshold = 0.5")


@app.command("train-classifier")
def train_cmd(
    pos: list[str] = typer.Option(..., "--pos", help="Good documents (JSONL with `text`); repeatable."),
    neg: list[str] = typer.Option(..., "--neg", help="Bad documents (JSONL with `text`); repeatable."),
    out: str = typer.Option(..., "--out", help="Directory to write the classifier to."),
    word_ngrams: int = typer.Option(3, "--word-ngrams", help="Longest word n-gram feature."),
    epochs: int = typer.Option(5, "--epochs", help="Passes over the data."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="tokenizer.json for sub-word tokens (default: words)."
    ),
    seed: int = typer.Option(0, "--seed", help="Shuffling and holdout seed."),
):
    """Train the fastText-style quality classifier (hashed n-grams, logistic regression).

    Prints the training report (held-out precision/recall/F1) as JSON on stdout.

    Example: cpmtool clean train-classifier --pos good.jsonl --neg bad.jsonl --out clf
    """
    import orjson

    from cpmtool.data.clean import train

    info = train(pos, neg, out, word_ngrams=word_ngrams, epochs=epochs, tokenizer=tokenizer, seed=seed)
    sys.stdout.write(orjson.dumps(info).decode() + "\n")


@app.command("dedup-merge")
def merge_cmd(
    signatures: str = typer.Argument(..., help="The --signatures directory of pass 1 (all shards)."),
    output: str = typer.Option("-", "-o", "--output", help="Drop list (JSONL); - is stdout."),
    stats: str = typer.Option(None, "--stats", help="Report JSON: drops and cluster sizes per stage."),
):
    """Sharded dedup pass 2: all shards' signatures -> the list of duplicates to drop.

    Example: cpmtool clean dedup-merge sigs/ -o drops.jsonl --stats dedup.json
    """
    from cpmtool.data.clean import merge

    merge(signatures, output, stats_path=stats)


@app.command("dedup-apply")
def apply_cmd(
    files: list[str] = typer.Argument(..., help="One shard's pass-1 output."),
    drops: str = typer.Option(..., "--drops", help="The drop list from dedup-merge."),
    shard: str = typer.Option(None, "--shard", help="i/N: which shard this output is."),
    output: str = typer.Option("-", "-o", "--output", help="Deduplicated documents; - is stdout."),
    rejects: str = typer.Option(None, "--rejects", help="The dropped duplicates, with dup_of."),
    stats: str = typer.Option(None, "--stats", help="Stats JSON."),
):
    """Sharded dedup pass 3: remove the duplicates listed by dedup-merge from one shard.

    Example: cpmtool clean dedup-apply kept/3.jsonl --drops drops.jsonl --shard 3/8 -o final/3.jsonl
    """
    from cpmtool.data.clean import apply_drops

    apply_drops(files, output, drops=drops, shard=shard, rejects=rejects, stats_path=stats)


@app.command("verify")
def verify_cmd(
    candidate: list[str] = typer.Option(
        ..., "--candidate", help="Documents to judge (e.g. cleaned output); repeat to judge several at once."
    ),
    baseline: str = typer.Option(..., "--baseline", help="The default mix: pre-training and both anneals."),
    eval_set: str = typer.Option(
        ..., "--eval", help="Held-out documents of the kind the model should learn."
    ),
    share: float = typer.Option(0.3, "--share", help="Candidate share of each annealing batch."),
    pretrain_steps: int = typer.Option(
        300, "--pretrain-steps", help="Reference model: warmup + stable steps."
    ),
    anneal_steps: int = typer.Option(100, "--anneal-steps", help="Steps of each anneal."),
    seeds: int = typer.Option(1, "--seeds", help="Repetitions with other seeds, to see the noise."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
):
    """UltraClean efficient verification: anneal a small cpm-tiny-family model on the candidate data.

    Trains a byte-level MiniCPM-architecture reference model on the baseline mix (warmup + stable
    phase), then anneals it on the baseline alone and once per candidate (baseline with --share
    from the candidate) and prints a JSON report on stdout: held-out bits per byte of each,
    delta_bpb (baseline - candidate; positive means the candidate helps) and helps.

    Example: cpmtool clean verify --candidate clean.jsonl --candidate rejects.jsonl --baseline raw.jsonl --eval ref.jsonl
    """
    import orjson

    from cpmtool.data.clean.verify import VerifyConfig, verify

    def log(d):
        print(f"cpmtool: {d}", file=sys.stderr)

    cfg = VerifyConfig(
        share=share, pretrain_steps=pretrain_steps, anneal_steps=anneal_steps, seeds=seeds, threads=threads
    )
    report = verify(candidate, baseline, eval_set, cfg, log=log)
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
