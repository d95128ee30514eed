# cpm-tiny: train the embedded MiniCPM4-architecture model from scratch, then evaluate it.
#
#   make -f pipelines/cpm-tiny.mk cpm-tiny   # recipe + evaluation -> cpmtool/model/weights/cpm-tiny/
#   make -f pipelines/cpm-tiny.mk eval       # greedy accuracy (and pass@8) of the shipped weights
#   make -f pipelines/cpm-tiny.mk FAST=1 all # smoke run (tests/pipelines): 20 steps into out/cpm-tiny-fast,
#                                            # never over the shipped weights
#
# The recipe is cpmtool.model.tiny.train_tiny (seeded); it writes config.json, model.safetensors,
# the tokenizer with its chat template, generation_config.json and card.json (params, time,
# tokens, accuracy per task and level, the eval command). THREADS=2 is the 2-core budget; on a
# machine shared with other jobs THREADS=1 avoids thread stragglers and is faster.

# FAST=1: train a few steps into a scratch directory; set before the defaults, which `?=` leaves alone
ifeq ($(FAST),1)
OUT     ?= out/cpm-tiny-fast
STEPS   ?= 20
N       ?= 4
THREADS ?= 1
# no card evaluation (hundreds of generations); `eval` is a bench eval of N test problems instead
TRAIN_ARGS ?= --set evaluate=false
EVAL_CMD ?= $(PYTHON) -m cpmtool bench eval --model $(OUT) --data arithmetic --n-prompts $(N) --max-tokens 96 \
            --threads $(THREADS)
endif

PYTHON  ?= .venv/bin/python
OUT     ?= cpmtool/model/weights/cpm-tiny
THREADS ?= 2
SEED    ?= 0
STEPS   ?=
N       ?= 500

.PHONY: all cpm-tiny eval tasks

all: cpm-tiny eval

cpm-tiny:
	$(PYTHON) -m cpmtool.model.tiny train --out $(OUT) --seed $(SEED) --threads $(THREADS) $(if $(STEPS),--steps $(STEPS)) $(TRAIN_ARGS)

EVAL_CMD ?= CPMTOOL_THREADS=$(THREADS) $(PYTHON) -m cpmtool.model.tiny eval --model $(OUT) --split test --n $(N) --seed 0

eval:
	$(EVAL_CMD)

# the test prompts as records, for other tools (rollout, bench) to consume
tasks:
	$(PYTHON) -m cpmtool models tasks --task arithmetic --split test --n $(N) --seed 0
