"""JSONL streams: read/write with orjson, `.zst`/`.gz` by extension, `-` for stdin/stdout,
rejects with reason and line number, run stats, progress on stderr.

A command is usually one call:

    run_stream(paths, "-", stage, rejects=rejects, stats_path=stats, strict=strict)

where `stage(records)` yields records or `Reject(record, "reason")`.
"""

from cpmtool.io.jsonl import JsonlWriter, Reject, RejectSink, ensure_id, read_records, write_records
from cpmtool.io.run import run_stream
from cpmtool.io.stats import RunStats, progress_enabled
from cpmtool.io.streams import open_in, open_out

__all__ = [
    "JsonlWriter",
    "Reject",
    "RejectSink",
    "RunStats",
    "ensure_id",
    "open_in",
    "open_out",
    "progress_enabled",
    "read_records",
    "run_stream",
    "write_records",
]
