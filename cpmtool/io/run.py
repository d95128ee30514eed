"""`run_stream`: the JSONL-in, JSONL-out driver every data command is built on."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cpmtool.errors import ConfigError
from cpmtool.io.jsonl import JsonlWriter, Reject, RejectSink, ensure_id, handle_reject, read_records
from cpmtool.io.stats import RunStats, progress_enabled, show_progress

Stage = Callable[[Iterator[dict]], Iterable["dict | Reject"]]


def run_stream(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    stage: Stage | None = None,
    *,
    rejects: str | Path | None = None,
    stats_path: str | Path | None = None,
    strict: bool = False,
    progress: bool | None = None,
    stats: RunStats | None = None,
    ids: bool = True,
) -> RunStats:
    """Read JSONL records, pass them through `stage`, write what it yields; count everything.

    `stage` is a generator function: it gets an iterator of dicts and yields dicts (the output)
    or `Reject(record, reason)` (to the rejects file, counted under `reason`). Every input line
    ends in exactly one place, so for a 1:1 stage `in == out + rejected`; see RunStats for fan-out.
    At the end, a one-line summary goes to stderr and the stats to `stats_path` as JSON; both
    also after Ctrl-C (marked interrupted), when the output holds complete lines only.

    A stage that buffers records before rejecting them shares the stats to know their lines:

        stats = RunStats()
        def stage(records):
            for rec in records:
                batch.append((rec, stats.position))  # ... later: yield Reject(rec, "low_var", pos)
        run_stream(paths, "-", stage, stats=stats)

    Args:
        inputs: JSONL paths (`.zst`/`.gz` by extension) or `-` for stdin.
        output: JSONL path or `-` for stdout.
        stage: the transformation; None passes records through.
        rejects: path of the rejects file (`--rejects`); rejects are only counted when None.
        stats_path: where to write the stats JSON (`--stats`).
        strict: the first reject (malformed line or stage reject) raises InputError naming file:line.
        progress: force the stderr progress display on/off; None: CPMTOOL_PROGRESS or stderr is a TTY.
        stats: a RunStats to fill (so the stage can read `stats.position`); a new one if None.
        ids: give every record read a stable `id` (ensure_id) before the stage sees it.

    Returns:
        The filled RunStats.

    Raises:
        InputError: unreadable or corrupt input; any reject under `strict`.
        ConfigError: stdin/stdout named twice, or an output that is also an input.
    """
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    _check_paths(paths, output, rejects)
    stats = RunStats() if stats is None else stats
    stage = stage or (lambda records: records)
    out = JsonlWriter(output)
    try:
        with (
            RejectSink(rejects) if rejects is not None else contextlib.nullcontext() as sink,
            out,
            show_progress(stats, progress_enabled(progress)),
        ):
            records = read_records(paths, stats=stats, rejects=sink, strict=strict)
            for item in stage(map(ensure_id, records) if ids else records):
                if isinstance(item, Reject):
                    handle_reject(
                        item.record, item.reason, item.position or stats.position, stats, sink, strict
                    )
                else:
                    out.write(item)
                    stats.n_out = out.n
        stats.complete = True
    except KeyboardInterrupt:
        stats.n_out = out.n  # the lines that are in the output, also if Ctrl-C came mid-write
        _report(stats, stats_path)
        raise
    _report(stats, stats_path)
    return stats


def _report(stats: RunStats, stats_path: str | Path | None) -> None:
    if stats_path is not None:
        stats.write_json(stats_path)
    print(f"cpmtool: {stats.summary()}", file=sys.stderr)


def _check_paths(inputs: list, output, rejects) -> None:
    problems = []
    if sum(str(p) == "-" for p in inputs) > 1:
        problems.append("stdin (-) is given as an input more than once")
    if rejects is not None and str(rejects) == "-":
        problems.append("--rejects cannot be stdout (-); give it a file")
    files = {os.path.realpath(p) for p in inputs if str(p) != "-"}
    for name, p in (("output", output), ("--rejects", rejects)):
        if p is not None and str(p) != "-" and os.path.realpath(p) in files:
            problems.append(f"{name} {p} is also an input; it would be overwritten while being read")
    if problems:
        raise ConfigError(problems)
