"""cpmtool: composable tools for the life of an efficient small LLM."""

__version__ = "0.1.0"
