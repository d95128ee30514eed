"""`cpmtool quantize-ternary`: ternary QAT and 2-bit packing (library: cpmtool.quant.qat); flags = QATConfig fields."""

from __future__ import annotations

import json

from cpmtool.cli.train_rl import _progress_log, config_command
from cpmtool.quant.config import QATConfig

HELP = """Ternary QAT (BitCPM / BitNet b1.58) from a full-precision model, then 2-bit packing.

Every linear layer of the blocks becomes ternary ({-1, 0, +1} x absmean scale, per tensor or per
--group-size group; activations absmax int8 per token unless --act-bits 16); embeddings and the LM
head are kept. Evaluates the full-precision model and its naive ternarisation, fine-tunes the latent
weights through the straight-through estimator (optionally distilling from the original model,
--distill), packs 4 weights a byte and evaluates the packed file. Writes --out/model (load it with
--model in rollout, serve, bench), README.md and card.json (before/after), metrics.jsonl, curves.png,
run.json, checkpoints/. Prints the card as JSON.

Example: cpmtool models tasks --split train --n 5000 --solution > train.jsonl;
cpmtool quantize-ternary --model cpm-tiny --data train.jsonl --steps 300 --distill --out runs/ternary
"""


def _run(cfg: QATConfig) -> None:
    from cpmtool.quant.qat import quantize_ternary

    card = quantize_ternary(cfg, log=_progress_log())
    print(json.dumps(card))


command = config_command(QATConfig, _run, HELP)
