"""`cpmtool train-sft`: supervised fine-tuning (library: cpmtool.train.sft); flags = SFTConfig fields."""

from __future__ import annotations

import json

from cpmtool.cli.train_rl import _progress_log, config_command
from cpmtool.train.config import SFTConfig

HELP = """Supervised fine-tuning on chat data: loss on the assistant replies only, optional packing.

Reads SFT records (`messages`, or `prompt` + `completion`), renders them with the model's chat
template and trains with AdamW. Writes --out/metrics.jsonl, curves.png, run.json, checkpoints/
(HF layout; --resume) and model/; prints the final metrics as JSON.

Example: cpmtool train-sft --model smollm2-135m --data sft.jsonl --pack --max-len 1024 --lr 2e-5 --out runs/sft
"""


def _train(cfg: SFTConfig) -> None:
    from cpmtool.train.sft import train_sft

    result = train_sft(cfg, log=_progress_log())
    if result.get("rank", 0) == 0:
        print(json.dumps(result))


command = config_command(SFTConfig, _train, HELP)
