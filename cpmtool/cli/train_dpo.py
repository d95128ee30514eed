"""`cpmtool train-dpo`: DPO against a frozen reference (library: cpmtool.train.dpo); flags = DPOConfig fields."""

from __future__ import annotations

import json

from cpmtool.cli.train_rl import _progress_log, config_command
from cpmtool.train.config import DPOConfig

HELP = """Direct preference optimisation on (prompt, chosen, rejected) pairs with a frozen reference.

The reference is the initial model; --beta sets the strength of the implicit KL to it. Writes
--out/metrics.jsonl (loss, rewards of chosen/rejected, margin, pair accuracy), curves.png,
run.json, checkpoints/ and model/; prints the final metrics as JSON.

Example: cpmtool annotate-pref ... > pairs.jsonl && cpmtool train-dpo --model smollm2-135m --data pairs.jsonl --beta 0.1 --out runs/dpo
"""


def _train(cfg: DPOConfig) -> None:
    from cpmtool.train.dpo import train_dpo

    result = train_dpo(cfg, log=_progress_log())
    if result.get("rank", 0) == 0:
        print(json.dumps(result))


command = config_command(DPOConfig, _train, HELP)
