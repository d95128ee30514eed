"""The `cpmtool` typer app: global flags, subcommand registration, error rendering.

Keep this module and the cli modules free of heavy imports (torch, transformers): they are
loaded for `cpmtool --help`, which must answer in well under a second.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from cpmtool import __version__
from cpmtool.errors import CpmtoolError

app = typer.Typer(
    name="cpmtool",
    help="Composable tools for the life of an efficient small LLM: clean -> synth-if -> annotate-pref -> "
    "rollout -> train-rl -> quantize-ternary -> serve -> bench. Every command reads and writes JSONL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# (name, module under cpmtool.cli, one-line help). A module exposes either `app` (a typer group)
# or `command` (a function). Commands whose issue has not landed are registered as stubs.
_COMMANDS: list[tuple[str, str | None, str]] = [
    ("models", "models", "List, pull, inspect and export models (cpm-tiny, smollm2-135m, local dirs, GGUF)."),
    ("clean", "clean", "Filter, dedupe and score pre-training documents (UltraClean)."),
    ("synth-if", "synth_if", "Synthesise instruction-following data (UltraIF)."),
    ("annotate-pref", "annotate_pref", "Build preference pairs by point-wise judging (AIR)."),
    ("rollout", "rollout", "Sample completions, score them with verifiers or majority vote."),
    ("train-rl", "train_rl", "RL on a policy: GRPO/DAPO, PRIME, NFT, LUFFY, TTRL, Clip-Cov/KL-Cov."),
    ("train-sft", "train_sft", "Supervised fine-tuning."),
    ("train-dpo", "train_dpo", "Direct preference optimisation."),
    ("quantize-ternary", "quantize_ternary", "Ternary QAT and 2-bit packing (BitCPM)."),
    ("serve", "serve", "OpenAI-compatible HTTP server."),
    ("bench", "bench", "One-command benchmarks: quality and speed."),
]


def _version(value: bool):
    if value:
        typer.echo(f"cpmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    progress: bool = typer.Option(
        None, "--progress/--no-progress", help="Force progress bars on stderr on or off (default: when a TTY)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    _state["debug"] = debug
    if debug:
        os.environ["CPMTOOL_DEBUG"] = "1"
    if progress is not None:
        os.environ["CPMTOOL_PROGRESS"] = "1" if progress else "0"


def _stub(name: str):
    def command(ctx: typer.Context):
        raise NotImplementedError(name)

    return command


def _register():
    for name, module, help_text in _COMMANDS:
        if module is None:
            app.command(
                name,
                help=f"{help_text} [not implemented yet]",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                add_help_option=True,
            )(_stub(name))
            continue
        mod = importlib.import_module(f"cpmtool.cli.{module}")
        if hasattr(mod, "app"):
            # a group's own callback docstring (its --help) wins; the table's one-liner is the fallback
            cb = mod.app.registered_callback
            if cb is not None and cb.callback is not None and cb.callback.__doc__:
                app.add_typer(mod.app, name=name)
            else:
                app.add_typer(mod.app, name=name, help=help_text)
        else:
            app.command(name, help=None if mod.command.__doc__ else help_text)(mod.command)  # docstring: --help


_register()


def _command_name(argv: list[str]) -> str:
    names = {n for n, _, _ in _COMMANDS}
    for a in argv:
        if a in names:
            return f"cpmtool {a}"
    return "cpmtool"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, render errors as one line, map signals to exit codes."""
    from typer.exceptions import TyperException

    argv = sys.argv[1:] if argv is None else argv
    prog = _command_name(argv)
    try:
        rc = app(args=argv, prog_name="cpmtool", standalone_mode=False)
    except NotImplementedError as e:
        print(f"{prog}: error: not implemented yet ({e.args[0] if e.args else prog})", file=sys.stderr)
        sys.exit(2)
    except CpmtoolError as e:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    except SystemExit:
        # typer catches EPIPE itself, wraps stdout in PacifyFlushWrapper and exits 1; for a Unix
        # filter a reader that stopped early (`| head`) is success
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _quiet_broken_pipe()
            sys.exit(0)
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except TyperException as e:  # usage errors (typer vendors click's exceptions)
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:  # an unexpected bug: still one line unless --debug
        if _state["debug"]:
            raise
        print(f"{prog}: error: internal error: {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _quiet_broken_pipe() -> None:
    # `| head` closed our stdout: point it at devnull so the interpreter's final flush stays silent.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
