"""JSONL records: reading several files leniently, writing whole lines, rejects, stable ids.

Nothing is lost: every non-blank input line is counted in `stats.n_in` and ends either as a record
handed on or as a reject (`bad_utf8`, `bad_json`, `not_object`, or a stage's own reason). Blank and
whitespace-only lines are not records: they are counted in `stats.empty_lines` and skipped, so
a trailing newline never trips `--strict`. Line numbers count every physical line from 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from cpmtool.errors import InputError
from cpmtool.io.stats import RunStats
from cpmtool.io.streams import open_in, open_out

_BOM = b"\xef\xbb\xbf"
_DUMP = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


def ensure_id(record: dict) -> dict:
    """Give `record` a stable `id` unless it has one: a hash of its content, independent of key order.

    Returns the same dict, changed in place.
    """
    if record.get("id") is None:
        blob = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        record["id"] = hashlib.blake2b(blob, digest_size=8).hexdigest()
    return record


@dataclass(frozen=True)
class Reject:
    """Yielded by a stage instead of a record: `record` goes to the rejects file with `reason`.

    `position` is the record's (source, line). Leave it None when rejecting the record the stage
    got last (the driver fills in `stats.position`); a stage that buffers records before judging
    them keeps `stats.position` beside each one and passes it here.
    """

    record: dict
    reason: str
    position: tuple[str, int] | None = None


def read_records(
    paths: str | Path | Sequence[str | Path],
    *,
    stats: RunStats,
    rejects: RejectSink | None = None,
    strict: bool = False,
) -> Iterator[dict]:
    """Yield the JSON objects of one or more JSONL files (`-` is stdin), in order.

    Malformed lines are rejected (counted in `stats`, written to `rejects` if given) and the
    stream goes on. While a record is being handled, `stats.position` is its (source, line).

    Args:
        paths: one path or several; `.zst`/`.gz` are decompressed.
        stats: counts in/rejected/empty lines and tracks the current position.
        rejects: where unparsable lines go, as `{"raw": text}` plus the reject fields.
        strict: raise InputError at the first malformed line instead.

    Raises:
        InputError: a file is missing, unreadable or corrupt; or a malformed line under `strict`.
    """
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        source = str(path)
        stats.sources.append(source)
        for lineno, raw in enumerate(_lines(path), 1):
            stats.source, stats.line = source, lineno
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                stats.empty_lines += 1
                continue
            stats.n_in += 1
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                try:
                    raw.decode("utf-8")
                    reason = "bad_json"
                except UnicodeDecodeError:
                    reason = "bad_utf8"
                handle_reject({"raw": _text(raw)}, reason, (source, lineno), stats, rejects, strict, str(e))
                continue
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                handle_reject(
                    {"raw": _text(raw)}, "not_object", (source, lineno), stats, rejects, strict, kind
                )
                continue
            yield obj


def _lines(path: str | Path) -> Iterator[bytes]:
    # Corrupt or truncated compressed data shows up only while reading: turn it into one line.
    import zstandard

    with open_in(path) as fh:
        it = iter(fh)
        while True:
            try:
                line = next(it)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
                raise InputError(f"{path}: cannot read: {e}") from e
            yield line


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def handle_reject(
    record: dict,
    reason: str,
    position: tuple[str, int],
    stats: RunStats,
    rejects: RejectSink | None,
    strict: bool,
    detail: str = "",
) -> None:
    """Count a reject and write it out, or under `strict` raise InputError naming file:line and reason."""
    source, line = position
    if strict:
        why = f"{reason} ({detail})" if detail else reason
        raise InputError(f"{source}:{line}: {why} [strict mode stops at the first reject]")
    stats.rejected[reason] += 1
    if rejects is not None:
        rejects.write_reject(record, reason, position)


class _SigintGuard:
    """Holds Ctrl-C back while bytes are being written, so an interrupted run leaves whole lines.

    Outside a write, Ctrl-C raises KeyboardInterrupt at once as usual (a stage stuck in a long
    generation still stops); inside one, it is raised as soon as the write is done. A second
    Ctrl-C during the same write (a reader that never drains the pipe) raises at once.
    """

    def __init__(self):
        self.depth = 0
        self.pending = False
        self.users = 0
        self.previous = None

    def handler(self, signum, frame):
        if self.depth and not self.pending:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def acquire(self):
        if self.users == 0:
            if threading.current_thread() is not threading.main_thread():
                return
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return  # someone else decided what Ctrl-C does; leave it alone
            self.previous = signal.signal(signal.SIGINT, self.handler)
        self.users += 1

    def release(self):
        if self.users == 0:
            return
        self.users -= 1
        if self.users == 0:
            signal.signal(signal.SIGINT, self.previous)
            self.pending = False


_GUARD = _SigintGuard()


class JsonlWriter:
    """Write records as JSONL (orjson, one object per line) to a path, `.zst`/`.gz`, or `-`.

    Lines are buffered and flushed every `flush_s` seconds or 64 KiB, and on close, on Ctrl-C
    included, so the output always ends with a complete line. A BrokenPipeError (`| head`)
    propagates untouched and nothing more is written.

    Use as a context manager: `with JsonlWriter("-") as out: out.write(record)`.
    """

    def __init__(self, path: str | Path = "-", *, flush_s: float = 1.0):
        self.path = str(path)
        self.n = 0
        self._flush_s = flush_s
        self._buf = bytearray()
        self._stack = contextlib.ExitStack()
        self._fh = None
        self._last = 0.0

    def __enter__(self) -> JsonlWriter:
        with contextlib.ExitStack() as stack:
            self._fh = stack.enter_context(open_out(self.path))
            _GUARD.acquire()
            stack.callback(_GUARD.release)
            self._stack = stack.pop_all()
        self._last = time.monotonic()
        return self

    def write(self, record: dict) -> None:
        self._buf.extend(orjson.dumps(record, option=_DUMP))  # one call: the buffer holds whole lines
        self.n += 1
        if len(self._buf) >= 1 << 16 or time.monotonic() - self._last >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        self._write_out()
        if _GUARD.pending and not _GUARD.depth:
            _GUARD.pending = False
            raise KeyboardInterrupt

    def _write_out(self) -> None:
        _GUARD.depth += 1
        try:
            self._fh.write(self._buf)
            self._buf.clear()
            self._fh.flush()
            self._last = time.monotonic()
        finally:
            _GUARD.depth -= 1

    def __exit__(self, exc_type, exc, tb):
        reader_gone = exc_type is not None and issubclass(exc_type, BrokenPipeError) and self.path == "-"
        if not reader_gone:
            try:
                self._write_out()  # also after Ctrl-C: what is buffered are whole lines
            except BaseException as e:
                if not self._stack.__exit__(type(e), e, e.__traceback__):
                    raise
                return None
        return self._stack.__exit__(exc_type, exc, tb)


class RejectSink(JsonlWriter):
    """The `--rejects` file: each rejected record with `reject_reason`, `reject_source`, `reject_line`.

    Unparsable lines appear as `{"raw": <the line as text, bad bytes as \\x escapes>}`. The
    fields are prefixed so they never overwrite a record's own `source` or `line`.
    """

    def write_reject(self, record: dict, reason: str, position: tuple[str, int]) -> None:
        source, line = position
        out = {"reject_reason": reason, "reject_source": source, "reject_line": line}
        out.update((k, v) for k, v in record.items() if k not in out)
        self.write(out)


def write_records(records: Iterable[dict], path: str | Path = "-") -> int:
    """Write `records` as JSONL to `path` (`-` is stdout); returns how many were written."""
    with JsonlWriter(path) as out:
        for record in records:
            out.write(record)
    return out.n
