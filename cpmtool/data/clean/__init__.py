"""UltraClean-style pre-training data cleaning: rule filters, dedup, a quality classifier.

Stages (each `stage(record) -> True | (False, "reason_code")`, composed by `pipeline.compose`):
normalise, lang, url, gopher_repetition, gopher_quality, c4, fineweb, exact_dedup, minhash,
and quality (the classifier). Entry points are in `run`: `clean`, `merge`, `apply_drops`, `train`.
"""

from cpmtool.data.clean.pipeline import DEFAULT_STAGES, compose, stage_names
from cpmtool.data.clean.run import apply_drops, clean, merge, parse_shard, train

__all__ = [
    "DEFAULT_STAGES",
    "apply_drops",
    "clean",
    "compose",
    "merge",
    "parse_shard",
    "stage_names",
    "train",
]
