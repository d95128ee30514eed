"""`cpmtool models ...`: the model registry commands (filled in by the foundation issue)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_models():
    """List the registered models and whether each is installed."""
    raise NotImplementedError("models list")
