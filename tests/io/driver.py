"""A tiny command over `run_stream` for the subprocess tests, with the exit handling of cli/app.py main().

    python tests/io/driver.py INPUT... [-o OUT] [--rejects R] [--stats S] [--copies N] [--announce]

--copies N yields every record N times (a fan-out, to outrun `| head`); --announce writes
`seen K` to stderr after each record so a test knows what has been read before it sends Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> None:
    # A parent that ignores SIGINT (a background shell job) would pass that on; we want the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--output", default="-")
    ap.add_argument("--rejects")
    ap.add_argument("--stats")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--announce", action="store_true")
    args = ap.parse_args()

    from cpmtool.errors import CpmtoolError
    from cpmtool.io import run_stream

    def stage(records):
        for k, record in enumerate(records, 1):
            for i in range(args.copies):
                yield {**record, "copy": i} if args.copies > 1 else record
            if args.announce:
                print(f"seen {k}", file=sys.stderr, flush=True)

    try:
        run_stream(args.inputs, args.output, stage, rejects=args.rejects, stats_path=args.stats)
    except CpmtoolError as e:
        print(f"driver: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # as cli/app.py: point stdout at devnull so the interpreter's last flush stays silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
