"""Domain errors. Library code raises these; the CLI turns them into one line and exit 2."""

from __future__ import annotations


class CpmtoolError(Exception):
    """Base class of every error cpmtool reports to a user."""


class ConfigError(CpmtoolError):
    """Bad flags or config values. Collects all problems and reports them together."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class InputError(CpmtoolError):
    """Unreadable or malformed input (files, records)."""


class ModelError(CpmtoolError):
    """A model that cannot be found, loaded or converted."""


class MissingDependencyError(CpmtoolError):
    """An optional dependency is not installed; the message names the pip command."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = "", alternative: str = ""):
        hint = f"pip install 'cpmtool[{extra}]'" if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        alt = f" ({alternative})" if alternative else ""
        super().__init__(f"{package} is not installed{what}; run: {hint}{alt}")
        self.package = package


class NotImplementedYet(CpmtoolError):
    """A command whose issue has not landed."""


def require(module: str, package: str | None = None, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency lazily or raise MissingDependencyError with a pip hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, extra, purpose) from e
