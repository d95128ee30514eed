"""Man pages generated from the CLI itself: `python -m cpmtool.cli.manpages man/` (or `make man`).

NAME, SYNOPSIS, OPTIONS and COMMANDS come from the click objects that typer builds from the
app, so a flag cannot be added without the page changing; DESCRIPTION and EXAMPLES are
hand-written in man/src/<page>.md (a small markdown subset, see `markdown_to_roff`).
tests/cli/test_manpages.py regenerates the pages and compares them byte for byte with man/.

The output depends on nothing but the app and the sources: no date, no terminal width, no
rich rendering (help text is taken raw, with rich style tags removed).
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

from cpmtool import __version__

# Shown after each command's own sections; the per-option variables (e.g. --api-key's) are added.
ENVIRONMENT = [
    ("CPMTOOL_HOME", "Where converted models are cached (default `~/.cache/cpmtool`): `models pull` writes "
                     "there and `--model NAME` looks there. Nothing is downloaded from a hub at run time. "
                     "The CPU attention kernels are built into its `kernels/` on first use."),
    ("CPMTOOL_CPU_KERNELS", "`0` turns off the C kernels for CPU attention, built on first use with the system "
                            "C compiler (`cc` or `$CC`) for an x86 CPU with AVX2/FMA: InfLLM v2 sparse attention "
                            "then runs as torch ops (about 1.4x slower at 64k tokens) and the decode step of dense "
                            "attention through SDPA (4-9% slower decoding). Without a compiler the torch path "
                            "runs anyway, with one warning."),
    ("CPMTOOL_PROGRESS", "`1` draws progress bars on stderr even when it is not a terminal, `0` never; unset: "
                         "only on a terminal. `cpmtool --progress/--no-progress` set it."),
]
EXIT_STATUS = [
    ("0", "Success; also when stdout was closed early (`| head`)."),
    ("1", "Internal error (a bug): one line on stderr, the traceback with `cpmtool --debug`."),
    ("2", "Error in the input, the configuration, a model or a missing dependency, or a usage error; one "
          "line `cpmtool <cmd>: error: ...` on stderr. A stub command exits 2 too."),
    ("130", "Interrupted (Ctrl-C); what was written so far is flushed."),
]
STUB_MARK = "[not implemented yet]"
SRC_SECTIONS = ("DESCRIPTION", "EXAMPLES")  # required in every man/src/<page>.md
_REPO_SRC = Path(__file__).resolve().parents[2] / "man" / "src"


# ---- roff ------------------------------------------------------------------------------------

_SPECIAL = {"\\": r"\e", "-": r"\-", "'": r"\(aq", "`": r"\(ga", "~": r"\(ti", "^": r"\(ha"}


def roff_escape(text: str) -> str:
    """Plain text -> roff text: backslashes, hyphens (as ASCII minus), quotes, non-ASCII (\\[uXXXX])."""
    out = []
    for ch in text:
        if ch in _SPECIAL:
            out.append(_SPECIAL[ch])
        elif ord(ch) > 126 or (ord(ch) < 32 and ch not in "\n\t"):
            out.append(f"\\[u{ord(ch):04X}]")
        else:
            out.append(ch)
    return "".join(out)


def roff_line(line: str) -> str:
    """Guard a text line whose first character roff would read as a control character."""
    return "\\&" + line if line[:1] in (".", "'") else line


def _inline(text: str) -> str:
    """Escape running text; `code` and **strong** become bold, *word* italic (sources and help text)."""
    parts = re.split(r"(`[^`]+`|\*\*[^*\s][^*]*\*\*|(?<![\w*])\*[^*\s][^*]*\*(?![\w*]))", text)
    out = []
    for p in parts:
        if len(p) > 1 and p[0] == p[-1] == "`":
            out.append(r"\fB" + roff_escape(p[1:-1]) + r"\fR")
        elif len(p) > 4 and p.startswith("**") and p.endswith("**"):
            out.append(r"\fB" + roff_escape(p[2:-2]) + r"\fR")
        elif len(p) > 2 and p[0] == p[-1] == "*":
            out.append(r"\fI" + roff_escape(p[1:-1]) + r"\fR")
        else:
            out.append(roff_escape(p))
    return "".join(out)


def _fill(text: str) -> str:
    """A filled paragraph: whitespace collapsed (roff keeps runs of spaces), one line."""
    return roff_line(_inline(" ".join(text.split())))


def _pre(lines: list[str]) -> list[str]:
    """A no-fill block (commands, examples), indented."""
    return [".RS 4", ".nf", *(roff_line(roff_escape(x)) for x in lines), ".fi", ".RE"]


def _section(name: str) -> str:
    return f'.SH "{name}"' if " " in name else f".SH {name}"


# ---- help text -------------------------------------------------------------------------------

_TAG = re.compile(r"(\\*)\[([a-zA-Z#/@][^\[\]]*?)\]")


def strip_markup(text: str, mode: str | None = "rich") -> str:
    """Remove rich style tags ([bold], [/], [red on white], [link=...]) but keep bracketed text that
    is no style, such as `[default: 1e-06]` or `[L(1-r), L(1+r)]`. `\\[` is rich's literal `[`."""
    if mode != "rich":
        return text
    from rich.errors import StyleSyntaxError
    from rich.style import Style

    def is_style(tag: str) -> bool:
        if tag.startswith("/") or tag == "link" or tag.startswith("link="):
            return True
        try:
            Style.parse(tag)
        except StyleSyntaxError:
            return False
        return True

    def sub(m: re.Match) -> str:
        slashes, tag = m.group(1), m.group(2)
        if len(slashes) % 2:  # escaped: a literal "["
            return slashes[:-1] + "[" + tag + "]"
        return slashes if is_style(tag) else m.group(0)

    return _TAG.sub(sub, text)


def _help_text(text: str | None, mode: str | None) -> str:
    if not text:
        return ""
    text = inspect.cleandoc(text).partition("\f")[0]
    return strip_markup(text, mode)


_EXAMPLE = re.compile(r"^(Examples?:)[ \t]*")


def help_to_roff(text: str) -> list[str]:
    """A command's docstring -> roff paragraphs.

    Blank lines separate paragraphs. `Example: cmd` paragraphs and indented paragraphs (or ones
    that start with click's `\\b`) keep their lines; in other paragraphs a line starting with `-`
    starts a new line (a list of flags), the rest is filled.
    """
    out: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text.strip("\n")):
        lines = para.split("\n")
        if lines and lines[0].strip() == "\b":
            out += [".PP", *_pre(textwrap.dedent("\n".join(lines[1:])).split("\n"))]
            continue
        m = _EXAMPLE.match(lines[0])
        if m:
            first = lines[0][m.end():]
            width = m.end()
            rest = [x[min(width, len(x) - len(x.lstrip())):] for x in lines[1:]]
            body = [x for x in [first, *rest] if x.strip()]
            out += [".PP", roff_escape(m.group(1))]
            if body:
                out += _pre(body)
            continue
        if all(x.startswith((" ", "\t")) for x in lines if x.strip()):
            out += [".PP", *_pre(textwrap.dedent(para).split("\n"))]
            continue
        out.append(".PP")
        chunk: list[str] = []
        for x in lines:
            if x.lstrip().startswith("-") and chunk:
                out.append(_fill(" ".join(chunk)))
                out.append(".br")
                chunk = []
            chunk.append(x)
        out.append(_fill(" ".join(chunk)))
    return out


def first_sentence(text: str) -> str:
    """The summary for NAME: the first sentence of the first paragraph, without its full stop."""
    para = " ".join(re.split(r"\n[ \t]*\n", text.strip())[0].split())
    return re.split(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", para)[0].rstrip(".").strip()


# ---- walking the click tree ------------------------------------------------------------------


def _context(cmd, name: str, parent=None):
    try:
        from typer._click import Context  # typer >= 0.22 vendors click
    except ImportError:  # pragma: no cover - older typer on top of click
        from click import Context
    return Context(cmd, parent=parent, info_name=name, **(cmd.context_settings or {}))


def _subcommands(cmd, ctx) -> list[tuple[str, object]]:
    commands = getattr(cmd, "commands", None)
    if commands is None:
        return []
    names = cmd.list_commands(ctx) if hasattr(cmd, "list_commands") else sorted(commands)
    return [(n, commands[n]) for n in names if not getattr(commands[n], "hidden", False)]


def _is_group(cmd) -> bool:
    return getattr(cmd, "commands", None) is not None


def _markup_mode(cmd) -> str | None:
    return getattr(cmd, "rich_markup_mode", None)


def _params(cmd, ctx):
    args, opts = [], []
    for p in cmd.get_params(ctx):
        if getattr(p, "hidden", False):
            continue
        (args if p.param_type_name == "argument" else opts).append(p)
    return args, opts


def _arg_term(p) -> str:
    """FILES... in italics: the argument's metavar or name, upper case; `...` when it repeats."""
    return r"\fI" + roff_escape((p.metavar or p.name or "ARG").upper()) + r"\fR" + ("..." if p.nargs == -1 else "")


def _usage(cmd, ctx, command: bool = True) -> list[str]:
    """The synopsis after the command path: [OPTIONS], the arguments, COMMAND [ARGS]... for groups."""
    args, _ = _params(cmd, ctx)
    pieces = [r"[\fIOPTIONS\fR]"]
    for p in args:
        piece = _arg_term(p)
        pieces.append(piece if p.required else f"[{piece}]")
    if command and _is_group(cmd):
        pieces.append(r"\fICOMMAND\fR [\fIARGS\fR]...")
    return pieces


def _split_help(p, ctx, mode) -> tuple[str, str]:
    """(help, extras): the param's own help and typer's `[default: ...; required]` note."""
    record = p.get_help_record(ctx)
    full = record[1] if record else ""
    own = p.help or ""
    extras = full[len(own):].strip() if full.startswith(own) else ""
    return strip_markup(inspect.cleandoc(own), mode), extras


_TERM_TOKEN = re.compile(r"<[^>]*>(?:\.\.\.)?|[^\s,/;]+|[\s,/;]+")


def _option_term(p, ctx) -> str:
    record = p.get_help_record(ctx)
    term = record[0] if record else ", ".join(p.opts)
    out = []
    for tok in _TERM_TOKEN.findall(term):
        if tok.startswith("-"):
            out.append(r"\fB" + roff_escape(tok) + r"\fR")
        elif tok.strip(" ,/;"):
            out.append(r"\fI" + roff_escape(tok) + r"\fR")
        else:
            out.append(roff_escape(re.sub(r"\s+", " ", tok)))
    return roff_line("".join(out))


def _param_entry(term: str, help_text: str, extras: str) -> list[str]:
    body = " ".join(help_text.split())
    extras = extras.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    text = _inline(body) if body else ""
    if extras:
        text = (text + " " if text else "") + roff_escape(extras)
    return [".TP", term, roff_line(text) if text else r"\&"]


def _options_block(cmd, ctx) -> tuple[list[str], list[str]]:
    """(arguments, options) as .TP lists."""
    mode = _markup_mode(cmd)
    args, opts = _params(cmd, ctx)
    a_out, o_out = [], []
    for p in args:
        help_text, extras = _split_help(p, ctx, mode)
        a_out += _param_entry(_arg_term(p), help_text, extras)
    for p in opts:
        help_text, extras = _split_help(p, ctx, mode)
        o_out += _param_entry(_option_term(p, ctx), help_text, extras)
    return a_out, o_out


def _envvars(cmd, ctx) -> list[tuple[str, str]]:
    """Environment variables that options read (e.g. --api-key from OPENAI_API_KEY), the whole tree."""
    found = []
    for p in cmd.get_params(ctx):
        env = getattr(p, "envvar", None)
        for e in [env] if isinstance(env, str) else list(env or ()):
            flag = max(p.opts, key=len) if p.opts else p.name
            found.append((e, f"Default of `{flag}` ({ctx.command_path})."))
    for name, sub in _subcommands(cmd, ctx):
        found += _envvars(sub, _context(sub, name, ctx))
    return found


def _is_stub(cmd) -> bool:
    return STUB_MARK in (cmd.help or "")


# ---- markdown sources ------------------------------------------------------------------------


def parse_source(text: str) -> dict[str, str]:
    """`## SECTION` headings -> {SECTION: markdown body}, in the file's order."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        m = re.match(r"^##\s+(.+?)\s*$", line)
        if m:
            current = m.group(1).upper()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip("\n") for k, v in sections.items()}


def markdown_to_roff(md: str) -> list[str]:
    """The markdown the sources use: paragraphs, `- ` bullets (continued by indented lines),
    ``` fenced or 4-space indented code blocks, `### Subsection`, `code` and *emphasis*."""
    out: list[str] = []
    lines = md.split("\n")
    i = 0
    para: list[str] = []

    def flush():
        if para:
            out.extend([".PP", _fill(" ".join(para))])
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out += [".PP", *_pre(lines[i + 1:j])]
            i = j + 1
            continue
        if line.startswith("    ") and not para:
            j = i
            block = []
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                block.append(lines[j][4:])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            out += [".PP", *_pre(block)]
            i = j
            continue
        if line.startswith("### "):
            flush()
            out.append(f'.SS "{roff_escape(line[4:].strip())}"')
        elif re.match(r"^[-*] ", line):
            flush()
            item = [line[2:]]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                item.append(lines[i].strip())
                i += 1
            out += [r".IP \(bu 2", _fill(" ".join(item))]
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return out


def _load_source(src_dir: Path, page: str) -> dict[str, str]:
    path = src_dir / f"{page}.md"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: write its hand-written sections "
                                f"({', '.join('## ' + s for s in SRC_SECTIONS)}), then run `make man`")
    sections = parse_source(path.read_text(encoding="utf-8"))
    missing = [s for s in SRC_SECTIONS if not sections.get(s)]
    if missing:
        raise ValueError(f"{path}: missing or empty section(s) {', '.join(missing)}")
    return sections


# ---- pages -----------------------------------------------------------------------------------


def _header(page: str, summary: str) -> list[str]:
    title = page.upper()
    return [
        f'.\\" Generated by `python -m cpmtool.cli.manpages` from the CLI and man/src/{page}.md; do not edit.',
        f'.TH "{title}" 1 "" "cpmtool {roff_escape(__version__)}" "cpmtool manual"',
        ".nh",  # no hyphenation: identifiers and flags must stay whole
        ".ad l",  # ragged right: no stretched spaces between words
        ".SH NAME",
        roff_line(f"{roff_escape(page)} \\- {_inline(summary)}"),
    ]


def _tail(sections: dict[str, str], env: list[tuple[str, str]], see_also: list[str]) -> list[str]:
    out = [".SH EXAMPLES", *markdown_to_roff(sections["EXAMPLES"])]
    for name, body in sections.items():
        if name not in ("DESCRIPTION", "EXAMPLES", "SEE ALSO"):
            out += [_section(name), *markdown_to_roff(body)]
    out.append(".SH ENVIRONMENT")
    seen = set()
    for var, text in [*ENVIRONMENT, *env]:
        if (var, text) in seen:
            continue
        seen.add((var, text))
        out += [".TP", r"\fB" + roff_escape(var) + r"\fR", _fill(text)]
    out.append('.SH "EXIT STATUS"')
    for code, text in EXIT_STATUS:
        out += [".TP", roff_escape(code), _fill(text)]
    out.append('.SH "SEE ALSO"')
    refs = [r"\fB" + roff_escape(p) + r"\fR(1)" for p in see_also]
    extra = sections.get("SEE ALSO", "").strip()
    body = ",\n".join(refs)
    out.append(body + ("," if extra else ""))
    if extra:
        out.append(_fill(extra))
    return out


def _summary(cmd) -> str:
    text = first_sentence(_help_text(cmd.help, _markup_mode(cmd)).replace(STUB_MARK, ""))
    return text + (" (not implemented yet)" if _is_stub(cmd) else "")


def _synopsis(path: str, cmd, ctx, command: bool = True) -> list[str]:
    return [roff_line(r"\fB" + roff_escape(path) + r"\fR " + " ".join(_usage(cmd, ctx, command)))]


def _command_sections(path: str, cmd, ctx, depth: int = 0) -> list[str]:
    """A subcommand of a group page: synopsis, its help text, arguments and options; recursive."""
    out = [f'.SS "{roff_escape(path)}"']
    out += help_to_roff(_help_text(cmd.help, _markup_mode(cmd)))
    if getattr(cmd, "epilog", None):
        out += help_to_roff(_help_text(cmd.epilog, _markup_mode(cmd)))
    args, opts = _options_block(cmd, ctx)
    if args:
        out += [".PP", "Arguments:", ".RS 4", *args, ".RE"]
    if opts:
        out += [".PP", "Options:", ".RS 4", *opts, ".RE"]
    for name, sub in _subcommands(cmd, ctx):
        out += _command_sections(f"{path} {name}", sub, _context(sub, name, ctx), depth + 1)
    return out


def command_page(name: str, cmd, root_ctx, sections: dict[str, str], all_pages: list[str]) -> str:
    """cpmtool-<name>(1): one top-level command (a plain command or a group of subcommands)."""
    ctx = _context(cmd, name, root_ctx)
    path = f"cpmtool {name}"
    page = f"cpmtool-{name}"
    out = _header(page, _summary(cmd))
    out.append(".SH SYNOPSIS")
    subs = _subcommands(cmd, ctx)
    if subs:
        if getattr(cmd, "invoke_without_command", False):
            out += [*_synopsis(path, cmd, ctx, command=False), ".br"]
        for i, (sub_name, sub) in enumerate(subs):
            out += _synopsis(f"{path} {sub_name}", sub, _context(sub, sub_name, ctx))
            if i < len(subs) - 1:
                out.append(".br")
    else:
        out += _synopsis(path, cmd, ctx)
    out.append(".SH DESCRIPTION")
    if _is_stub(cmd):
        out += [".PP", _fill(f"Not implemented yet: `{path}` is registered as a stub and exits with status 2. "
                              "This page describes what it will do.")]
    out += markdown_to_roff(sections["DESCRIPTION"])
    args, opts = _options_block(cmd, ctx)
    if args:
        out += [".SH ARGUMENTS", *args]
    if opts:
        out += [".SH OPTIONS", *opts]
    if subs:
        out.append(".SH COMMANDS")
        for sub_name, sub in subs:
            out += _command_sections(f"{path} {sub_name}", sub, _context(sub, sub_name, ctx))
    see = ["cpmtool", *[p for p in all_pages if p not in ("cpmtool", page)]]
    out += _tail(sections, _envvars(cmd, ctx), see)
    return "\n".join(out) + "\n"


def root_page(root, ctx, names: list[str], sections: dict[str, str], all_pages: list[str]) -> str:
    """cpmtool(1): the global options and the list of commands."""
    out = _header("cpmtool", _summary(root))
    out += [".SH SYNOPSIS", *_synopsis("cpmtool", root, ctx), ".SH DESCRIPTION"]
    out += markdown_to_roff(sections["DESCRIPTION"])
    _, opts = _options_block(root, ctx)
    out += [".SH OPTIONS", *opts, ".SH COMMANDS"]
    commands = dict(_subcommands(root, ctx))
    for name in names:
        out += [".TP", r"\fBcpmtool\-" + roff_escape(name) + r"\fR(1)", _fill(_summary(commands[name]))]
    out += _tail(sections, [], [p for p in all_pages if p != "cpmtool"])
    return "\n".join(out) + "\n"


def command_names(app_module=None) -> list[str]:
    """Top-level commands in the order of app.py's _COMMANDS, then any others by name."""
    if app_module is None:
        from cpmtool.cli import app as app_module
    import typer.main

    root = typer.main.get_command(app_module.app)
    ctx = _context(root, "cpmtool")
    present = [n for n, _ in _subcommands(root, ctx)]
    order = [entry[0] for entry in getattr(app_module, "_COMMANDS", [])]
    return [n for n in order if n in present] + sorted(n for n in present if n not in order)


def render_pages(app=None, src_dir: str | Path | None = None, names: list[str] | None = None) -> dict[str, str]:
    """{file name: roff text} for cpmtool.1 and cpmtool-<cmd>.1 of every top-level command."""
    import typer.main

    if app is None:
        from cpmtool.cli import app as app_module

        app = app_module.app
        names = names or command_names(app_module)
    src = Path(src_dir) if src_dir is not None else _REPO_SRC
    root = typer.main.get_command(app)
    ctx = _context(root, "cpmtool")
    commands = dict(_subcommands(root, ctx))
    names = names or list(commands)
    all_pages = ["cpmtool", *[f"cpmtool-{n}" for n in names]]
    pages = {"cpmtool.1": root_page(root, ctx, names, _load_source(src, "cpmtool"), all_pages)}
    for name in names:
        pages[f"cpmtool-{name}.1"] = command_page(
            name, commands[name], ctx, _load_source(src, f"cpmtool-{name}"), all_pages)
    return pages


def write_pages(out_dir: str | Path, src_dir: str | Path | None = None) -> list[Path]:
    """Write the pages into out_dir and remove generated pages of commands that no longer exist."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages = render_pages(src_dir=src_dir)
    for stale in out.glob("cpmtool*.1"):
        if stale.name not in pages:
            stale.unlink()
    written = []
    for fname, text in pages.items():
        path = out / fname
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cpmtool.cli.manpages", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="Where to write cpmtool.1 and cpmtool-<cmd>.1 (e.g. man/).")
    parser.add_argument("--src", default=None, help=f"Hand-written sections (default: {_REPO_SRC}).")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if a page is stale.")
    args = parser.parse_args(argv)
    if args.check:
        pages = render_pages(src_dir=args.src)
        out = Path(args.out_dir)
        stale = [f for f, t in pages.items() if not (out / f).exists() or (out / f).read_text(encoding="utf-8") != t]
        stale += [p.name for p in out.glob("cpmtool*.1") if p.name not in pages]
        for f in stale:
            print(f"{out / f} is stale: run `make man`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_pages(args.out_dir, args.src):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
