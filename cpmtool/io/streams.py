"""Byte streams for JSONL: compression chosen by file extension, `-` for stdin/stdout.

`.zst` is zstandard, `.gz` is gzip, anything else is plain. Standard input is sniffed instead
(there is no name to go by), so `zstdcat`-free pipes like `cat x.jsonl.zst | cpmtool clean -` work.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cpmtool.errors import ConfigError, InputError

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 17


def compression_of(path: str | Path) -> str | None:
    """`"zst"`, `"gz"` or None (plain), from the file name."""
    name = str(path)
    if name.endswith(".zst"):
        return "zst"
    if name.endswith(".gz"):
        return "gz"
    return None


@contextlib.contextmanager
def open_in(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path` for reading bytes, decompressing by extension; `-` is standard input.

    Raises:
        InputError: the file is missing, a directory, or unreadable (one line, naming the path).
    """
    if str(path) == "-":
        stdin = sys.stdin.buffer
        head = stdin.peek(4)[:4] if hasattr(stdin, "peek") else b""
        kind = "zst" if head.startswith(_ZSTD_MAGIC) else "gz" if head.startswith(_GZIP_MAGIC) else None
        yield _decompressing(stdin, kind)  # stdin is not ours to close
        return
    try:
        raw = open(path, "rb", buffering=_CHUNK)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror or e})") from None
    with raw:
        yield _decompressing(raw, compression_of(path))


def _decompressing(raw: BinaryIO, kind: str | None) -> BinaryIO:
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "zst":
        return io.BufferedReader(_ZstdReader(raw), buffer_size=_CHUNK)
    return raw


class _ZstdReader(io.RawIOBase):
    """Decompresses frame after frame and, unlike zstandard's stream_reader, notices a truncated last frame."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            chunk = self._obj.unused_data if self._obj is not None and self._obj.eof else b""
            if chunk:
                self._obj = None
            else:
                chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._obj is not None and not self._obj.eof:
                    raise EOFError("zstd data ends in the middle of a frame (truncated file?)")
                return 0
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            self._out = self._obj.decompress(chunk)
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


@contextlib.contextmanager
def open_out(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path` for writing bytes, compressing by extension; `-` is standard output.

    Parent directories are created. Stdout is flushed but not closed at the end; after a
    BrokenPipeError (`| head` went away) nothing more is attempted on it.

    Raises:
        ConfigError: the path cannot be created or written.
    """
    if str(path) == "-":
        out = sys.stdout.buffer
        yield out  # the JsonlWriter on top flushes it, also when interrupted
        out.flush()
        return
    kind = compression_of(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        raw = open(path, "wb", buffering=_CHUNK)
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e})") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(raw)
        if kind == "gz":
            # mtime=0: the same records give the same bytes.
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0))
        elif kind == "zst":
            import zstandard

            # closing the writer ends the frame, so an interrupted run still leaves a valid file
            yield stack.enter_context(zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False))
        else:
            yield raw
