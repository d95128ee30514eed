"""Per-run counts (in, out, rejected by reason), the summary line, and the progress display."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunStats:
    """Counts of one run, and the (source, line) of the record being handled.

    For a 1:1 stage, `n_in == n_out + n_rejected` once the run is complete. A stage that fans
    out (rollout with n > 1) or merges reports `n_out` as it is; `n_in` still counts input
    records and every one of them that was not used is in `rejected`. Blank lines are not
    records: they are counted in `empty_lines` only.
    """

    n_in: int = 0
    n_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    empty_lines: int = 0
    sources: list[str] = field(default_factory=list)
    source: str = ""
    line: int = 0
    complete: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def position(self) -> tuple[str, int]:
        """(source, line) of the record read last."""
        return self.source, self.line

    @property
    def n_rejected(self) -> int:
        return sum(dict(self.rejected).values())  # a copy: the progress thread reads it too

    def to_dict(self) -> dict:
        return {
            "in": self.n_in,
            "out": self.n_out,
            "rejected": self.n_rejected,
            "rejected_by_reason": dict(sorted(dict(self.rejected).items())),
            "empty_lines": self.empty_lines,
            "inputs": list(self.sources),
            "complete": self.complete,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def summary(self) -> str:
        """One line, e.g. `1000 in, 990 out, 10 rejected (bad_json 7, too_short 3), 1.2s`."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(dict(self.rejected).items()))
        text = f"{self.n_in} in, {self.n_out} out, {self.n_rejected} rejected"
        if reasons:
            text += f" ({reasons})"
        text += f", {time.monotonic() - self.started:.1f}s"
        return text if self.complete else text + " (interrupted)"

    def write_json(self, path: str | Path) -> None:
        import orjson

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")


def progress_enabled(force: bool | None = None) -> bool:
    """Whether to draw progress on stderr: `force` if given, else env CPMTOOL_PROGRESS=1/0, else a TTY."""
    if force is not None:
        return force
    env = os.environ.get("CPMTOOL_PROGRESS", "")
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr is not None and sys.stderr.isatty()


@contextlib.contextmanager
def show_progress(stats: RunStats, enabled: bool) -> Iterator[None]:
    """A spinner with the live counts of `stats` on stderr, redrawn by rich's own thread."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner

    spinner = Spinner("dots")

    class _Counts:
        def __rich__(self):
            spinner.update(text=stats.summary().removesuffix(" (interrupted)"))
            return spinner

    with Live(_Counts(), console=Console(file=sys.stderr), refresh_per_second=4, transient=True):
        yield
