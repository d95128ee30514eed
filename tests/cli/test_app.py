"""The top-level CLI: help, version, stubs for commands not landed, error rendering."""

import subprocess
import sys

import pytest

CPMTOOL = [sys.executable, "-m", "cpmtool"]


def run(*args, **kw):
    return subprocess.run([*CPMTOOL, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_every_design_command():
    r = run("--help")
    assert r.returncode == 0
    for name in ["clean", "synth-if", "annotate-pref", "rollout", "train-rl", "train-sft", "train-dpo",
                 "quantize-ternary", "serve", "bench", "models"]:
        assert name in r.stdout, name


def test_help_does_not_import_torch():
    # `cpmtool --help` must stay fast: importing the CLI may not pull in torch or transformers.
    code = (
        "import sys\n"
        "from cpmtool.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr


def test_version():
    from cpmtool import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cpmtool {__version__}"


@pytest.mark.parametrize("cmd", ["clean", "synth-if", "annotate-pref", "rollout", "train-rl", "train-sft",
                                 "train-dpo", "quantize-ternary", "serve", "bench"])
def test_commands_not_landed_exit_2(cmd):
    from cpmtool.cli.app import _COMMANDS

    if dict((n, m) for n, m, _ in _COMMANDS)[cmd] is not None:
        pytest.skip(f"{cmd} has landed")
    r = run(cmd, "--some-flag", "x")
    assert r.returncode == 2
    assert r.stderr.strip() == f"cpmtool {cmd}: error: not implemented yet ({cmd})"
    assert r.stdout == ""


def test_unknown_command_is_a_usage_error():
    r = run("no-such-command")
    assert r.returncode == 2
    assert "No such command" in r.stderr
    assert "Traceback" not in r.stderr


def test_show_completion():
    r = run("--show-completion", env={"SHELL": "/bin/bash", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    assert "complete" in r.stdout


def test_head_closing_stdout_ends_quietly():
    # `| head` closes the pipe early: the command exits 0 with nothing on stderr
    r = subprocess.run(f"{sys.executable} -m cpmtool models tasks --n 20000 | head -1; exit ${{PIPESTATUS[0]}}",
                       shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("\n") == 1
