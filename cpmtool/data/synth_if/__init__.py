"""UltraIF (kkk-an/UltraIF, arXiv 2502.04153): synthesise instruction-following data in four stages.

    decompose -> compose -> generate -> filter

`decompose` asks a model to split real prompts into a basic query, constraints and one
evaluation question per constraint; `compose` adds constraints to queries, drawn from that pool and
from IFEval's verifiable instructions (`cpmtool.rewards.ifeval`); `generate` samples k responses
per composed prompt; `filter` keeps responses that pass the programmatic checkers and an LLM
judge's YES/NO answers to the evaluation questions, writing SFT records and preference pairs.
Every model answer goes through the on-disk cache of `cpmtool.engine.cache`, so a rerun is cheap.
See `cpmtool.data.synth_if.stages` for the record fields.
"""

from cpmtool.data.synth_if.stages import SynthStats, compose, decompose, filter_responses, generate

__all__ = ["SynthStats", "compose", "decompose", "filter_responses", "generate"]
