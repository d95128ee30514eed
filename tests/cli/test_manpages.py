"""man/: the pages are regenerated from the CLI and must match the committed ones byte for byte."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from cpmtool.cli import app as app_module
from cpmtool.cli import manpages

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("man")
    manpages.write_pages(out, MAN / "src")
    return out


def test_committed_pages_match_the_cli(fresh):
    generated = {p.name: p.read_text(encoding="utf-8") for p in sorted(fresh.glob("*.1"))}
    committed = {p.name: p.read_text(encoding="utf-8") for p in sorted(MAN.glob("*.1"))}
    problems = []
    for name in sorted(set(generated) | set(committed)):
        if name not in committed:
            problems.append(f"man/{name} is missing")
        elif name not in generated:
            problems.append(f"man/{name} belongs to no command any more")
        elif generated[name] != committed[name]:
            diff = difflib.unified_diff(committed[name].splitlines(), generated[name].splitlines(),
                                        f"man/{name}", "regenerated", lineterm="", n=1)
            problems.append("\n".join(list(diff)[:30]))
    assert not problems, "man pages are stale; run `make man` and commit man/:\n" + "\n".join(problems)


def test_generation_is_deterministic(fresh, tmp_path, monkeypatch):
    # another terminal width and a second run must not change a byte
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setenv("TERMINAL_WIDTH", "37")
    manpages.write_pages(tmp_path, MAN / "src")
    for page in fresh.glob("*.1"):
        assert (tmp_path / page.name).read_bytes() == page.read_bytes(), page.name


def test_every_command_subcommand_and_flag_is_documented(fresh):
    root = typer.main.get_command(app_module.app)
    names = [entry[0] for entry in app_module._COMMANDS]
    assert names and set(names) <= set(root.commands)
    root_page = (fresh / "cpmtool.1").read_text()
    for name in names:
        page = fresh / f"cpmtool-{name}.1"
        assert page.exists(), f"no page for `cpmtool {name}`"
        assert f"cpmtool\\-{manpages.roff_escape(name)}\\fR(1)" in root_page
        text = page.read_text()
        cmd = root.commands[name]
        todo = [(f"cpmtool {name}", cmd)]
        while todo:
            path, c = todo.pop()
            if path != f"cpmtool {name}":
                assert f'.SS "{manpages.roff_escape(path)}"' in text, f"{path} has no section in {page.name}"
            for p in c.params:
                for flag in [*p.opts, *p.secondary_opts]:
                    if flag.startswith("-"):
                        assert f"\\fB{manpages.roff_escape(flag)}\\fR" in text, f"{path} {flag} not in {page.name}"
            todo += [(f"{path} {n}", sub) for n, sub in getattr(c, "commands", {}).items()]
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXAMPLES", "ENVIRONMENT", '"EXIT STATUS"', '"SEE ALSO"'):
            assert f".SH {section}\n" in text, f"{page.name} lacks {section}"


def test_stub_commands_say_so(fresh):
    stubs = [n for n, module, _ in app_module._COMMANDS if module is None]
    for name in stubs:
        assert "Not implemented yet" in (fresh / f"cpmtool-{name}.1").read_text()
    implemented = [n for n, module, _ in app_module._COMMANDS if module is not None]
    for name in implemented:
        assert "Not implemented yet" not in (fresh / f"cpmtool-{name}.1").read_text()


def test_roff_escaping():
    assert manpages.roff_escape("a\\b-c 'd' `e` ~/f ^g") == r"a\eb\-c \(aqd\(aq \(gae\(ga \(ti/f \(hag"
    assert manpages.roff_escape("μP → x") == r"\[u03BC]P \[u2192] x"
    assert manpages.roff_line(".hidden") == r"\&.hidden" and manpages.roff_line("'q") == r"\&'q"
    # a leading dot or quote in help text cannot become a roff request
    lines = manpages.help_to_roff("Intro.\n\n.gguf files and 'quoted' lines\n\nExample: cpmtool x --y '\\n'")
    assert r"\&.gguf files and \(aqquoted\(aq lines" in lines
    assert r"cpmtool x \-\-y \(aq\en\(aq" in lines
    assert not any(x.startswith((".gguf", "'")) for x in lines)


def test_rich_markup_is_stripped_but_brackets_are_kept():
    assert manpages.strip_markup("[bold]Loud[/bold] and [red on white]x[/] [link=https://a.b]here[/link]") == (
        "Loud and x here")
    assert manpages.strip_markup("lr [default: 1e-06]; pip install 'cpmtool[datatrove]'; [L(1-r), L(1+r)]") == (
        "lr [default: 1e-06]; pip install 'cpmtool[datatrove]'; [L(1-r), L(1+r)]")
    assert manpages.strip_markup(r"a \[bold] literal") == "a [bold] literal"
    assert manpages.strip_markup("[bold]x[/bold]", mode=None) == "[bold]x[/bold]"


def test_a_new_flag_and_subcommand_are_picked_up(tmp_path):
    """The generator reads the typer app, so a flag appears without touching the generator."""
    demo = typer.Typer()
    group = typer.Typer(help="A group.")

    @group.command("sub")
    def sub(depth: int = typer.Option(3, "--depth", "-d", help="How [bold]deep[/bold]."),
            name: str = typer.Argument(..., help="A name.")):
        """Do the sub thing.

        Example: cpmtool grp sub x --depth 4
        """

    @demo.command("plain")
    def plain(fast: bool = typer.Option(False, "--fast/--slow", help=".starts with a dot")):
        """Plain command."""

    demo.add_typer(group, name="grp")
    src = tmp_path / "src"
    src.mkdir()
    for page in ("cpmtool", "cpmtool-grp", "cpmtool-plain"):
        (src / f"{page}.md").write_text(f"## DESCRIPTION\n\nAbout {page}.\n\n## EXAMPLES\n\n    {page} -h\n")
    pages = manpages.render_pages(demo, src, names=["grp", "plain"])
    grp = pages["cpmtool-grp.1"]
    assert '.SS "cpmtool grp sub"' in grp
    assert r"\fB\-d\fR, \fB\-\-depth\fR \fI<int>\fR" in grp
    assert "How deep. [default: 3]" in grp and "[bold]" not in grp
    assert r"\fBcpmtool grp sub\fR [\fIOPTIONS\fR] \fINAME\fR" in grp
    plain_page = pages["cpmtool-plain.1"]
    assert r"\fB\-\-fast\fR / \fB\-\-slow\fR" in plain_page and r"\&.starts with a dot" in plain_page
    (src / "cpmtool-plain.md").write_text("## DESCRIPTION\n\nNo examples.\n")
    with pytest.raises(ValueError, match="EXAMPLES"):
        manpages.render_pages(demo, src, names=["grp", "plain"])
    (src / "cpmtool-plain.md").unlink()
    with pytest.raises(FileNotFoundError, match="cpmtool-plain.md is missing"):
        manpages.render_pages(demo, src, names=["grp", "plain"])


def _render_env() -> dict:
    return {**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8",
            "MAN_KEEP_FORMATTING": ""}


def test_groff_reports_no_warnings():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (Debian: apt-get install groff-base); the byte compare still runs")
    for page in sorted(MAN.glob("*.1")):
        r = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True,
                           env=_render_env(), timeout=60)
        assert r.returncode == 0 and r.stderr == "", f"{page.name}: {r.stderr}"


def test_man_renders_rollout_page():
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian: apt-get install man-db); the byte compare still runs")
    r = subprocess.run(["man", "-l", str(MAN / "cpmtool-rollout.1")], capture_output=True, env=_render_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b"", r.stderr.decode()
    text = re.sub(r".\x08", "", r.stdout.decode("utf-8"))  # drop overstrike bold, if any
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    assert "cpmtool-rollout - Sample" in text
    assert "--max-tokens <int>" in text and "[default: 256]" in text
    assert "cpmtool models tasks --task arithmetic" in text
    # no roff leaked through: escapes, requests, markup
    assert not re.search(r"\\f[BIR]|\\\(|\\\[u|^\.[A-Z]{1,2}\b", text, re.M)
    assert "[/" not in text
