# BitCPM on cpm-tiny: ternary QAT from the full-precision model (distilled from it), the 2-bit
# packed model, its card (held-out perplexity and arithmetic accuracy of the full-precision model,
# of naive post-training ternarisation and after QAT), then bench ternary (bits per weight, file
# size against bf16, decode tokens/s against fp32) and a greedy rollout from the packed file.
#
#   make -f pipelines/bitcpm.mk all           # data -> qat -> bench -> rollout, into runs/bitcpm
#   make -f pipelines/bitcpm.mk FAST=1 all    # smoke run (tests/pipelines): 2 QAT steps, into out/bitcpm-fast
#
# GROUP must divide every linear input size of the model (cpm-tiny: 256, 768); 0 = one scale per tensor.
# THREADS=1: on a machine shared with other jobs one thread avoids thread stragglers.

ifeq ($(FAST),1)
OUT     ?= out/bitcpm-fast
STEPS   ?= 2
WARMUP  ?= 1
TRAIN_N ?= 24
BATCH   ?= 2
EVAL_N  ?= 4
TASK_N  ?= 4
MAXLEN  ?= 96
MAXTOK  ?= 8
REPEATS ?= 1
TEST_N  ?= 2
endif

PYTHON  ?= .venv/bin/python
CPMTOOL ?= $(PYTHON) -m cpmtool
MODEL   ?= cpm-tiny
OUT     ?= runs/bitcpm
STEPS   ?= 30
TRAIN_N ?= 6000
BATCH   ?= 16
GROUP   ?= 32
LR      ?= 3e-4
EVAL_N  ?= 64
TASK_N  ?= 200
WARMUP  ?= 5
MAXLEN  ?= 512
MAXTOK  ?= 64
REPEATS ?= 3
TEST_N  ?= 50
THREADS ?= 1

.PHONY: all data qat bench rollout clean

all: qat bench rollout

data: $(OUT)/train.jsonl

$(OUT)/train.jsonl:
	mkdir -p $(OUT)
	$(CPMTOOL) models tasks --task arithmetic --split train --n $(TRAIN_N) --seed 1 --level 1 --level 2 --level 3 \
	  --solution > $@

qat: $(OUT)/ternary/model/config.json

$(OUT)/ternary/model/config.json: $(OUT)/train.jsonl
	$(CPMTOOL) --progress quantize-ternary --model $(MODEL) --data $< --steps $(STEPS) --batch-size $(BATCH) \
	  --max-len $(MAXLEN) --group-size $(GROUP) --distill --lr $(LR) --warmup-steps $(WARMUP) --eval-n $(EVAL_N) --eval-task-n $(TASK_N) \
	  --threads $(THREADS) --out $(OUT)/ternary > $(OUT)/card.json

bench: qat
	$(CPMTOOL) bench ternary --model $(MODEL) --ternary $(OUT)/ternary/model --max-tokens $(MAXTOK) \
	  --repeats $(REPEATS) --threads $(THREADS) > $(OUT)/bench.json

rollout: qat
	$(CPMTOOL) models tasks --task arithmetic --split test --n $(TEST_N) --level 1 --level 2 --level 3 \
	  | $(CPMTOOL) rollout --model $(OUT)/ternary/model --reward math --temperature 0 --max-tokens 128 \
	  > $(OUT)/rollout.jsonl

clean:
	rm -rf $(OUT)
