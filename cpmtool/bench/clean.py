"""`bench clean`: the same rule set in datatrove and in cpmtool on the same documents.

Rules, in FineWeb's order and with datatrove's default settings on both sides:
GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter, FineWebQualityFilter.
(Language id is left out: datatrove's needs fastText's lid.176 downloaded; URL rules only
apply to documents with a URL.) Documents are read once into memory; only the filtering is
timed, one document at a time through every rule until one drops it, as both tools run.
Each side starts cold: datatrove's spaCy tokenizer and cpmtool's word cache are fresh.

Reports docs/s (wall clock) for each, the speed ratio on wall and on CPU time (the CPU ratio
is steadier on a shared machine), and how often the keep/drop decisions (and the
dropping rule) agree, with the documents where they differ.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from cpmtool.errors import InputError, MissingDependencyError

RULES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def _datatrove_filters():
    try:
        import spacy  # noqa: F401  (datatrove's English word tokenizer)
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
    except ImportError:
        raise MissingDependencyError(
            "bench clean --compare datatrove needs datatrove and spaCy (pip install 'cpmtool[datatrove]')"
        ) from None
    return [
        ("gopher_repetition", GopherRepetitionFilter()),
        ("gopher_quality", GopherQualityFilter()),
        ("c4", C4QualityFilter()),
        ("fineweb", FineWebQualityFilter()),
    ]


def _run_datatrove(texts: list[str]) -> tuple[list, float]:
    from datatrove.data import Document
    from datatrove.utils import text as dt_text
    from datatrove.utils import word_tokenizers

    # cold start: a new tokenizer and empty caches, as a fresh datatrove worker has
    word_tokenizers.load_word_tokenizer.cache_clear()
    dt_text.split_into_parts.cache_clear()
    filters = _datatrove_filters()
    decisions = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        decisions.append(_first_drop(filters, doc, lambda f, d: f.filter(d)))
    return decisions, time.perf_counter() - t0, time.process_time() - c0


def _run_cpmtool(texts: list[str]) -> tuple[list, float]:
    from cpmtool.data.clean.c4 import C4Quality
    from cpmtool.data.clean.fineweb import FineWebQuality
    from cpmtool.data.clean.gopher import GopherQuality, GopherRepetition
    from cpmtool.data.clean.words import english

    english()._cache.clear()  # cold start, as a fresh process
    filters = [(f.name, f) for f in (GopherRepetition(), GopherQuality(), C4Quality(), FineWebQuality())]
    decisions = []
    t0, c0 = time.perf_counter(), time.process_time()
    for text in texts:
        decisions.append(_first_drop(filters, {"text": text}, lambda f, r: f(r)))
    return decisions, time.perf_counter() - t0, time.process_time() - c0


def _first_drop(filters, doc, call) -> tuple[str, str] | None:
    for name, f in filters:
        res = call(f, doc)
        if res is not True:
            return name, res[1] if isinstance(res, tuple) else "dropped"
    return None


def bench_clean(
    inputs: str | Path | Sequence[str | Path],
    *,
    compare: str = "datatrove",
    repeat: int = 1,
    limit: int | None = None,
) -> dict:
    """Run the rule set in datatrove and in cpmtool on the documents of `inputs`.

    Args:
        inputs: JSONL files of documents with `text`.
        compare: the other implementation; only "datatrove".
        repeat: runs per side; the median time is reported.
        limit: use only the first this many documents.

    Returns:
        {"docs", "rules", "datatrove": {...}, "cpmtool": {...}, "speedup", "agreement",
         "rule_agreement", "disagreements"}.

    Raises:
        MissingDependencyError: datatrove or spaCy is not installed.
        InputError: no documents with text.
    """
    from cpmtool.errors import ConfigError
    from cpmtool.io import RunStats, read_records

    if compare != "datatrove":
        raise ConfigError(f"--compare {compare!r}: only datatrove is supported")
    if repeat < 1:
        raise ConfigError("--repeat must be >= 1")
    _datatrove_filters()  # fail early, before reading anything, if it is missing
    texts = []
    for rec in read_records(inputs, stats=RunStats()):
        if isinstance(rec.get("text"), str) and rec["text"].strip():
            texts.append(rec["text"])
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise InputError("no documents with a non-empty `text` to benchmark")

    results = {}
    for side, fn in (("datatrove", _run_datatrove), ("cpmtool", _run_cpmtool)):
        times, cpu, decisions = [], [], None
        for _ in range(repeat):
            decisions, seconds, cpu_seconds = fn(texts)
            times.append(seconds)
            cpu.append(cpu_seconds)
        sec = statistics.median(times)
        results[side] = {
            "seconds": round(sec, 4),
            "cpu_seconds": round(statistics.median(cpu), 4),
            "docs_per_s": round(len(texts) / sec, 1),
            "kept": sum(d is None for d in decisions),
            "decisions": decisions,
        }
    a, b = results["datatrove"].pop("decisions"), results["cpmtool"].pop("decisions")
    same_keep = sum((x is None) == (y is None) for x, y in zip(a, b, strict=True))
    same_rule = sum(x == y for x, y in zip(a, b, strict=True))
    diffs = [
        {
            "doc": i,
            "datatrove": "keep" if x is None else ":".join(x),
            "cpmtool": "keep" if y is None else ":".join(y),
        }
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if x != y
    ]
    n = len(texts)
    return {
        "docs": n,
        "rules": list(RULES),
        "datatrove": results["datatrove"],
        "cpmtool": results["cpmtool"],
        "speedup": round(results["datatrove"]["seconds"] / results["cpmtool"]["seconds"], 2),
        "cpu_speedup": round(results["datatrove"]["cpu_seconds"] / results["cpmtool"]["cpu_seconds"], 2),
        "agreement": round(same_keep / n, 4),
        "rule_agreement": round(same_rule / n, 4),
        "disagreements": diffs[:20],
        "n_disagreements": len(diffs),
    }


def format_report(report: dict) -> str:
    """A few lines for a person: docs/s of each side, the ratio, the agreement, any disagreements."""
    dt, cp = report["datatrove"], report["cpmtool"]
    lines = [
        f"bench clean: {report['docs']} documents, rules: {', '.join(report['rules'])}",
        f"  datatrove  {dt['docs_per_s']:>9.1f} docs/s  ({dt['seconds']:.2f} s wall, {dt['cpu_seconds']:.2f} s CPU)"
        f"  kept {dt['kept']}",
        f"  cpmtool    {cp['docs_per_s']:>9.1f} docs/s  ({cp['seconds']:.2f} s wall, {cp['cpu_seconds']:.2f} s CPU)"
        f"  kept {cp['kept']}",
        f"  speedup {report['speedup']:.2f}x wall, {report['cpu_speedup']:.2f}x CPU (target >= 2x)",
        f"  keep/drop agreement {100 * report['agreement']:.2f}% (target >= 99%), same rule "
        f"{100 * report['rule_agreement']:.2f}%",
    ]
    for d in report["disagreements"]:
        lines.append(f"    doc {d['doc']}: datatrove {d['datatrove']}, cpmtool {d['cpmtool']}")
    return "\n".join(lines)
