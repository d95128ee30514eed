"""Entry points of `cpmtool clean`: the cleaning run, the shard passes, classifier training.

Sharded dedup, the three passes (any scheduler can run the per-shard ones in parallel):

    # pass 1, for i in 0..N-1: filter shard i, write its output and its dedup signatures
    cpmtool clean raw/*.jsonl.zst --shard i/N --signatures sigs/ -o kept/$i.jsonl --rejects rej/$i.jsonl
    # pass 2, once: read all signatures, decide which documents are duplicates
    cpmtool clean dedup-merge sigs/ -o drops.jsonl
    # pass 3, for each i: remove them from shard i's output
    cpmtool clean dedup-apply kept/$i.jsonl --drops drops.jsonl --shard i/N -o final/$i.jsonl --rejects rej/dedup-$i.jsonl

The result equals one unsharded `cpmtool clean raw/*.jsonl.zst` (same inputs, same order).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cpmtool.data.clean.pipeline import (
    DEDUP_STAGES,
    DEFAULT_STAGES,
    StageCounts,
    StageSpec,
    apply_overrides,
    build_stages,
    compose,
    load_pipeline_file,
    parse_stages,
)
from cpmtool.errors import ConfigError, InputError


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`"i/N"` -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected i/N, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {shard!r}: need 0 <= i < N")
    return i, n


def resolve_specs(
    stages: str | Sequence[str] | None = None,
    pipeline: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> list[StageSpec]:
    """The stage list from --pipeline, else --stages, else the default; then --set overrides."""
    if pipeline is not None and stages is not None:
        raise ConfigError("give either --stages or --pipeline, not both")
    specs = (
        load_pipeline_file(pipeline) if pipeline is not None else parse_stages(stages or list(DEFAULT_STAGES))
    )
    apply_overrides(specs, overrides)
    return specs


def clean(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path = "-",
    *,
    stages: str | Sequence[str] | None = None,
    pipeline: str | Path | None = None,
    overrides: Sequence[str] = (),
    classifier: str | Path | None = None,
    threshold: float = 0.5,
    shard: str | None = None,
    signatures: str | Path | None = None,
    rejects: str | Path | None = None,
    stats_path: str | Path | None = None,
    strict: bool = False,
    progress: bool | None = None,
):
    """Filter, dedupe and score documents: JSONL in, kept documents out, drops to `rejects`.

    Args:
        inputs: JSONL paths (`.zst`/`.gz`) or `-`.
        output: where kept documents go (`-` is stdout).
        stages: comma-separated stage names in order ("default", "none" allowed).
        pipeline: a YAML pipeline file instead of `stages`.
        overrides: `STAGE.KEY=VALUE` settings (value parsed as YAML).
        classifier: a directory from `train_classifier`; adds a `quality` stage before dedup.
        threshold: keep documents with quality >= this.
        shard: `"i/N"`: process inputs i, i+N, i+2N, ... (file-level sharding).
        signatures: directory for pass 1 of sharded dedup: the dedup stages keep every document
          and write their keys there instead (then `merge` and `apply_drops`).
        rejects: the rejects file; each dropped document with `reject_reason` "<stage>:<rule>".
        stats_path: stats JSON: counts in/out/rejected by reason, per-stage counts, dedup clusters.
        strict: stop at the first malformed line or dropped document.
        progress: force progress on stderr on or off.

    Returns:
        The RunStats of the run.

    Raises:
        ConfigError: bad stage names or settings, bad --shard, dedup stages not at the end with --signatures.
        InputError: unreadable input (or, under strict, the first reject).
    """
    from cpmtool.io import RunStats, run_stream

    specs = resolve_specs(stages, pipeline, overrides)
    built = build_stages(specs)
    if classifier is not None:
        from cpmtool.data.clean.classifier import QualityClassifier, QualityFilter

        qf = QualityFilter(QualityClassifier.load(classifier), threshold)
        at = next((k for k, st in enumerate(built) if st.name in DEDUP_STAGES), len(built))
        built.insert(at, qf)
        specs.insert(at, StageSpec("quality", {"classifier": str(classifier), "threshold": threshold}))

    i, n = parse_shard(shard)
    all_inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    mine = [(j, p) for j, p in enumerate(all_inputs) if j % n == i]
    number_of = {str(p): j for j, p in mine}

    stats = RunStats()
    writer = None
    if signatures is not None:
        from cpmtool.data.clean.dedup import SignatureWriter, signature_path

        first = next((k for k, st in enumerate(built) if st.name in DEDUP_STAGES), len(built))
        dedup = built[first:]
        if any(st.name not in DEDUP_STAGES for st in dedup):
            raise ConfigError("with --signatures the dedup stages (exact_dedup, minhash) must come last")
        if not dedup:
            raise ConfigError("--signatures needs a dedup stage (exact_dedup or minhash) in the pipeline")
        writer = SignatureWriter(
            dedup, signature_path(signatures, i, n), i, n, lambda: (number_of[stats.source], stats.line)
        )
        built = built[:first] + [writer]

    counts: dict[str, StageCounts] = {}
    stage = compose(built, counts)
    report = _Report(stats, counts, specs, built, shard=(i, n), inputs=[str(p) for _, p in mine])
    try:
        run_stream(
            [p for _, p in mine],
            output,
            stage,
            rejects=rejects,
            strict=strict,
            progress=progress,
            stats=stats,
        )
        if writer is not None:
            writer.save()
    finally:
        if stats_path is not None:
            report.write(stats_path)
    return stats


class _Report:
    """The stats JSON: run_stream's counts plus per-stage counts, dedup clusters and the settings."""

    def __init__(self, stats, counts, specs, stages, **extra):
        self.stats, self.counts, self.specs, self.stages, self.extra = stats, counts, specs, stages, extra

    def to_dict(self) -> dict:
        out = self.stats.to_dict()
        out["stages"] = {name: c.to_dict() for name, c in self.counts.items()}
        for st in self.stages:
            if hasattr(st, "report"):
                out["stages"][st.name].update(st.report())
        out["pipeline"] = [
            {"stage": s.name, **({"settings": s.params} if s.params else {})} for s in self.specs
        ]
        i, n = self.extra["shard"]
        out["shard"] = f"{i}/{n}"
        return out

    def write(self, path: str | Path) -> None:
        import orjson

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(
            orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
        )


def merge(signatures: str | Path, output: str | Path = "-", *, stats_path: str | Path | None = None) -> dict:
    """Pass 2 of sharded dedup: all shards' signatures -> the drop list (JSONL) and a report.

    Returns:
        The report (documents, per-stage drops and cluster sizes).
    """
    from cpmtool.data.clean.dedup import merge_signatures
    from cpmtool.io import write_records

    drops, report = merge_signatures(signatures)
    write_records(drops, output)
    report["dropped"] = len(drops)
    if stats_path is not None:
        import orjson

        Path(stats_path).parent.mkdir(parents=True, exist_ok=True)
        Path(stats_path).write_bytes(
            orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
        )
    print(
        f"cpmtool: {report['documents']} documents in {report['shards']} shards, {len(drops)} duplicates",
        file=sys.stderr,
    )
    return report


def apply_drops(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path = "-",
    *,
    drops: str | Path,
    shard: str | None = None,
    rejects: str | Path | None = None,
    stats_path: str | Path | None = None,
    strict: bool = False,
    progress: bool | None = None,
):
    """Pass 3 of sharded dedup: remove the drop list's documents from one shard's pass-1 output.

    `inputs` is that output (records counted in order from 0, as pass 1 wrote them).

    Raises:
        InputError: the drop list is unreadable, or a listed document is not where it should be.
    """
    from cpmtool.io import Reject, RunStats, read_records, run_stream

    i, _ = parse_shard(shard)
    mine: dict[int, dict] = {}
    for d in read_records(drops, stats=RunStats(), strict=True):
        if d.get("shard") == i:
            mine[int(d["index"])] = d

    def stage(records):
        for k, rec in enumerate(records):
            d = mine.pop(k, None)
            if d is None:
                yield rec
                continue
            if str(rec.get("id")) != d["id"]:
                raise InputError(
                    f"record {k} of shard {i} has id {rec.get('id')!r}, the drop list says "
                    f"{d['id']!r}: is this the pass-1 output of shard {shard}?"
                )
            rec["dup_of"] = d["dup_of"]
            rec["reject_stage"], rec["reject_rule"] = d["stage"], d["reason"]
            yield Reject(rec, f"{d['stage']}:{d['reason']}")
        if mine:
            raise InputError(f"shard {i}: the drop list names {len(mine)} records past the end of the input")

    return run_stream(
        inputs,
        output,
        stage,
        rejects=rejects,
        stats_path=stats_path,
        strict=strict,
        progress=progress,
        ids=False,
    )


def train(
    pos: str | Path | Sequence[str | Path],
    neg: str | Path | Sequence[str | Path],
    out: str | Path,
    **settings,
) -> dict:
    """Train the quality classifier on good (`pos`) and bad (`neg`) JSONL documents; save to `out`.

    `settings` are ClassifierConfig fields. Returns what was saved in classifier.json (with metrics).
    """
    from cpmtool.data.clean.classifier import ClassifierConfig, train_classifier
    from cpmtool.data.clean.pipeline import build_config
    from cpmtool.io import RunStats, read_records

    cfg = build_config(ClassifierConfig, settings, "train-classifier")
    clf = train_classifier(read_records(pos, stats=RunStats()), read_records(neg, stats=RunStats()), cfg)
    clf.save(out)
    return {"out": str(out), **clf.info}
