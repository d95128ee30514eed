# cpm-tiny: train the embedded MiniCPM4-architecture model from scratch, then evaluate it.
#
#   make -f pipelines/cpm-tiny.mk cpm-tiny   # recipe + evaluation -> cpmtool/model/weights/cpm-tiny/
#   make -f pipelines/cpm-tiny.mk eval       # greedy accuracy (and pass@8) of the shipped weights
#
# The recipe is cpmtool.model.tiny.train_tiny (seeded); it writes config.json, model.safetensors,
# the tokenizer with its chat template, generation_config.json and card.json (params, time,
# tokens, accuracy per task and level, the eval command). THREADS=2 is the 2-core budget; on a
# machine shared with other jobs THREADS=1 avoids thread stragglers and is faster.

PYTHON  ?= .venv/bin/python
OUT     ?= cpmtool/model/weights/cpm-tiny
THREADS ?= 2
SEED    ?= 0
STEPS   ?=
N       ?= 500

.PHONY: cpm-tiny eval tasks

cpm-tiny:
	$(PYTHON) -m cpmtool.model.tiny train --out $(OUT) --seed $(SEED) --threads $(THREADS) $(if $(STEPS),--steps $(STEPS))

eval:
	CPMTOOL_THREADS=$(THREADS) $(PYTHON) -m cpmtool.model.tiny eval --model $(OUT) --split test --n $(N) --seed 0

# the test prompts as records, for other tools (rollout, bench) to consume
tasks:
	$(PYTHON) -m cpmtool models tasks --task arithmetic --split test --n $(N) --seed 0
