"""`cpmtool bench all`: the benchmark suite and its report (library: cpmtool.bench.suite)."""

from __future__ import annotations

import sys

import typer


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _commands() -> dict[str, set[str]]:
    """The `cpmtool bench` subcommands of this build and their option names."""
    import typer.main

    from cpmtool.cli.bench import app

    out = {}
    for info in app.registered_commands:
        cmd = typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=None)
        out[info.name] = {o for p in cmd.params for o in getattr(p, "opts", [])}
    return out


def all_cmd(
    quick: bool = typer.Option(False, "--quick", help="Smoke-test sizes: every benchmark in a minute or so."),
    only: str = typer.Option(None, "--only", help="Run only these benchmarks, comma-separated."),
    skip: str = typer.Option(None, "--skip", help="Leave these benchmarks out, comma-separated."),
    out: str = typer.Option("bench/results", "--out", help="Where the dated result directory is made."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads of the benchmarks that take --threads."),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds one benchmark may run before it is skipped."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda: where engine, train-rl and speed's server run "
                               "(attention uses CUDA whenever it is there)."),
):
    """Run the benchmark suite (engine, spec, attention, train-rl, clean, speed, eval, and ternary when
    this build has it) and write a report: report.md with one table per benchmark against its named
    peers, PNG plots, machine.json and the raw results, under OUT/<date>-<host>/.

    Each benchmark runs in its own process; one that fails (a missing optional peer such as
    datatrove, trl or vllm, a missing data file, a timeout) is a skipped row with its reason and the
    suite goes on. The summary goes to stderr, the results (JSON) to stdout.

    Benchmarks: engine, spec, attention, train-rl, clean, speed, eval, ternary.

    Example: cpmtool bench all --quick --only clean,attention; on a GPU node: cpmtool bench all --device cuda
    """
    import orjson

    from cpmtool.bench import check_device
    from cpmtool.bench.suite import default_suite, run_suite, select

    check_device(device)
    suite = select(default_suite(quick=quick, threads=threads, commands=_commands(), device=device), _names(only),
                   _names(skip))
    report = run_suite(suite, out, quick=quick, timeout=timeout,
                       log=lambda s: print(f"cpmtool bench all: {s}", file=sys.stderr, flush=True))
    for r in report["results"]:
        what = r["headline"] if r["status"] == "ok" else r["reason"]
        print(f"  {r['bench']:10s} {r['status']:8s} {what}", file=sys.stderr)
        for peer, why in r["skipped_peers"].items():
            print(f"  {r['bench'] + '/' + peer:10s} skipped  {why}", file=sys.stderr)
    print(f"report: {report['dir']}/report.md", file=sys.stderr)
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
