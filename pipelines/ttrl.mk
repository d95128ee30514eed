# TTRL on cpm-tiny: label-free test-time RL. The policy trains on the test prompts themselves with
# rewards from the majority vote of VOTE_N samples (the first N are trained on); the gold answers
# stay in the records only to log label accuracy and to measure greedy accuracy before/after.
#
#   make -f pipelines/ttrl.mk ttrl      # <= MINUTES of TTRL, eval_accuracy at step 0 and the end
#   make -f pipelines/ttrl.mk report
#   make -f pipelines/ttrl.mk bench     # bench eval (greedy and maj@k) of the base and the TTRL model
#   make -f pipelines/ttrl.mk FAST=1 all  # smoke run (tests/pipelines): 2 steps on tiny sizes, into out/ttrl-fast
#
# THREADS=2 is the 2-core budget; on a machine shared with other jobs THREADS=1 is faster.

# FAST=1: the whole recipe at smoke-test sizes; set before the defaults, which `?=` then leaves alone
ifeq ($(FAST),1)
OUT     ?= out/ttrl-fast
STEPS   ?= 2
TEST_N  ?= 8
VOTE_N  ?= 4
N       ?= 2
BATCH   ?= 2
MAXTOK  ?= 48
EVAL_N  ?= 2
THREADS ?= 1
LEVELS  ?= --level 1
endif

PYTHON  ?= .venv/bin/python
CPMTOOL ?= $(PYTHON) -m cpmtool
MODEL   ?= cpm-tiny
OUT     ?= runs/ttrl
THREADS ?= 2
MINUTES ?= 10
LR      ?= 1e-5
SEED    ?= 0
STEPS   ?= 400
TEST_N  ?= 200
VOTE_N  ?= 16
LEVELS  ?= --level 1 --level 2 --level 3
N       ?= 8
BATCH   ?= 8
MAXTOK  ?= 96
EVAL_N  ?= 8

.PHONY: data ttrl report bench all clean

data: $(OUT)/test.jsonl

$(OUT)/test.jsonl:
	mkdir -p $(OUT)
	$(CPMTOOL) models tasks --task arithmetic --split test --n $(TEST_N) --seed 0 $(LEVELS) > $@

ttrl: data
	$(CPMTOOL) --progress train-rl --algo ttrl --model $(MODEL) --prompts $(OUT)/test.jsonl \
	  --eval-prompts $(OUT)/test.jsonl --vote-n $(VOTE_N) --group-size $(N) --steps $(STEPS) --batch-size $(BATCH) \
	  --max-tokens $(MAXTOK) --temperature 1.0 --lr $(LR) --weight-decay 0.0 --max-minutes $(MINUTES) \
	  --threads $(THREADS) --seed $(SEED) --save-every 20 --out $(OUT)/ttrl

report:
	$(CPMTOOL) train-rl report $(patsubst %/run.json,%,$(wildcard $(OUT)/*/run.json))

all: ttrl report bench

# base vs TTRL model on the same test prompts, EVAL_N samples at T = 1 (pass@k, maj@k, tokens)
bench: data
	$(CPMTOOL) bench eval --model $(MODEL) --data $(OUT)/test.jsonl --n-prompts $(TEST_N) --n $(EVAL_N) \
	  --temperature 1.0 --max-tokens $(MAXTOK) --seed $(SEED) --threads $(THREADS) -o $(OUT)/eval-base.jsonl > /dev/null
	$(CPMTOOL) bench eval --model $(OUT)/ttrl/model --data $(OUT)/test.jsonl --n-prompts $(TEST_N) --n $(EVAL_N) \
	  --temperature 1.0 --max-tokens $(MAXTOK) --seed $(SEED) --threads $(THREADS) -o $(OUT)/eval-ttrl.jsonl > /dev/null
	$(CPMTOOL) bench score $(OUT)/eval-base.jsonl $(OUT)/eval-ttrl.jsonl --plot $(OUT)/plots > $(OUT)/bench.jsonl

clean:
	rm -rf $(OUT)
